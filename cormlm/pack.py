"""Weights packed for batched decoding: oneDNN's blocked layout in place of the plain one.

Which layout of a weight is fastest depends on how many rows each product has. One row
(decoding a single sequence) reads the weight once and is fastest from the plain layout
(``cormlm.models.linear`` measures its kernels there). A few rows (a batch of sequences,
a server's running requests) can be faster from oneDNN's blocked layout, which oneDNN
would otherwise reorder on every call; whether they are depends on the machine (where
cormlm's few-row C kernel streams the plain weight at the memory's speed, packing gains
nothing). ``pack_weights`` makes that trade for the
whole model: each linear layer's weight is reordered once and the plain copy dropped, so
memory stays the same; single-row products then run slower than before.
``scripts/bench_decode.py --pack-weights`` measures both sides on the machine at hand.
"""

from __future__ import annotations

import torch

from .errors import CormlmError
from .models.linear import ONEDNN_DTYPES, Linear, _onednn_available

DEFAULT_ROWS = 8  # the row count oneDNN chooses its blocking for (products of other sizes still run)


def pack_weights(model: torch.nn.Module, rows: int = DEFAULT_ROWS) -> torch.nn.Module:
    """Pack every linear layer of ``model`` for products of about ``rows`` rows, in place;
    returns the model. A weight shared with another module (an LM head tied to the
    embedding) keeps its plain layout: the embedding reads its rows. Packing is for
    inference on CPU and cannot be undone on that model object (load it again for the
    plain layout); a packed model cannot be compiled, sharded or saved."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise CormlmError(f"rows must be a whole number >= 1 (the batch the weights are packed for), got {rows!r}")
    if getattr(model, "compiled", False):
        raise CormlmError("pack_weights on a compiled model: packed weights run eager only (compiled graphs call "
                          "the plain ones); load the model again and pack it without compiling")
    if getattr(model, "tp", None) is not None:
        raise CormlmError("pack_weights is not supported with tensor parallelism; load the model without tp=")
    if not _onednn_available():
        raise CormlmError("this torch build has no oneDNN (mkldnn): packed weights need it; decode with plain weights")
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.packed is None]
    if not layers:
        return model
    weight = layers[0].weight
    if weight.device.type != "cpu" or weight.dtype not in ONEDNN_DTYPES:
        raise CormlmError(f"packed weights are for CPU float32 or bfloat16 models; this one is {weight.dtype} on "
                          f"{weight.device.type}")
    tied = model.lm_head if model.config.tie_word_embeddings else None  # the embedding reads its rows
    for layer in layers:
        if layer is not tied:
            layer.pack(rows)
    return model


def is_packed(model: torch.nn.Module) -> bool:
    return any(isinstance(m, Linear) and m.packed is not None for m in model.modules())

