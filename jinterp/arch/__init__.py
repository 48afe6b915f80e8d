"""The model's computation: parameters, the generic decoder, and its entry points.

This package's public surface is below; `decoder.py` (the per-call context, the block, the layer
scan) is internal to it.
"""

from jinterp.arch.forward import (
    PRE_BLOCK_SITES,
    Base,
    base_run,
    cells_view,
    emitted_sites,
    forward,
    from_attention_mixes,
    generate,
    position_ids,
    resume,
    resume_cells,
    resume_record,
    unembed,
)
from jinterp.arch.params import WEIGHTS, has_weight, param_shapes, replace_weight, weight

__all__ = [
    "PRE_BLOCK_SITES", "WEIGHTS", "Base", "base_run", "cells_view", "emitted_sites", "forward",
    "from_attention_mixes", "generate", "has_weight", "param_shapes", "position_ids", "replace_weight", "resume",
    "resume_cells", "resume_record", "unembed", "weight",
]
