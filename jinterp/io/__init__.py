"""Reading and writing model files.

    safetensors.py   Reader: named checkpoint tensors, checked by name and shape (CheckpointError)
    hf.py            HF config.json: the supported-architecture check and rotary / window parsing
    orbax.py         jinterp's own saved models (Model.save) and pytree checkpoints

Nothing here builds a Model: jinterp/loading.py puts config, parameters and tokenizer together.
"""
