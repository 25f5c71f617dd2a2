"""``torch.compile`` for the dense part of every step.

The projections, norms and MLPs of each block and the head have one shape per token
count, so inductor compiles them once (``dynamic=True``: batch and length stay symbolic);
attention over the ragged cache stays eager, since its shapes change as caches grow and
shrink. Compiled modules keep their parameters: nothing is copied.
"""

from __future__ import annotations

import torch

from .errors import CormlmError


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """Compile ``model``'s dense modules in place; returns the model."""
    if not hasattr(torch, "compile"):
        raise CormlmError(f"torch {torch.__version__} has no torch.compile; drop --compile")
    for block in model.blocks:
        for name in ("attn_norm", "mlp_norm", "mlp"):
            module = getattr(block, name)
            if module is not None:
                module.compile(dynamic=True)
        block.attn.qkv.compile(dynamic=True)
        block.attn.o_proj.compile(dynamic=True)
    model.final_norm.compile(dynamic=True)
    model.lm_head.compile(dynamic=True)
    return model
