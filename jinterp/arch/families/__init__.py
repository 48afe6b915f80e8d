"""Family registry: HF `model_type` -> the module that maps that family onto the generic decoder.

A family module defines MODEL_TYPES (HF `model_type` strings), PREFIXES (where its checkpoint
keeps the model body), `config(hf_config) -> Config` and `params(reader, cfg, hf_config) -> nested
dict of numpy arrays` (names and shapes: jinterp/arch/params.py). It reads HF config fields with
jinterp.io.hf and tensors through jinterp.io.safetensors.Reader; common.py has what several share.
A new family is one new file here, named in FAMILIES.
"""

from __future__ import annotations

from types import ModuleType

from jinterp.arch.families import gemma, gemma2, gemma3, gpt2, gptj, llama, mistral, neox, olmo2, phi3, qwen2, qwen3
from jinterp.arch.families import mixtral, olmoe, qwen2_moe

FAMILIES: tuple[ModuleType, ...] = (gpt2, neox, gptj, llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, olmo2, phi3,
                                    mixtral, qwen2_moe, olmoe)
MODEL_TYPES: dict[str, ModuleType] = {t: fam for fam in FAMILIES for t in fam.MODEL_TYPES}


def supported() -> list[str]:
    """The HF model types jinterp loads."""
    return sorted(MODEL_TYPES)


def family_for(model_type: str) -> ModuleType:
    """The family module for a supported HF model type (jinterp.io.hf.read_config checks it is one)."""
    return MODEL_TYPES[model_type]
