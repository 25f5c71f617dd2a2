"""Reading one rank's slice of each parameter, and nothing else, from the checkpoint.

Column-parallel parameters (q/k/v, gate/up, Falcon's up projection, the vocabulary rows of
the embedding and LM head) keep some of their rows; row-parallel ones (the attention output
and MLP down projections) keep some of their input columns; the rest (norms, the biases
of row-parallel layers, added once after the all-reduce) are read whole. A rank's rows of a
fused parameter are runs of rows of its checkpoint tensors (q/k/v are three tensors in
Llama, one reordered tensor in Falcon): each run is one ``get_slice`` read.
"""

from __future__ import annotations

import torch

from ..checkpoint.layout import ParamSource
from .plan import ShardPlan


def _span(start: int, count: int, scale: int = 1, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset + start * scale, offset + (start + count) * scale)


def owned_rows(target: str, plan: ShardPlan) -> torch.Tensor | None:
    """Rows of our parameter ``target`` this rank holds, in order (None: every row)."""
    config, d = plan.config, plan.config.head_dim
    leaf = target.split(".", 2)[-1] if target.startswith("blocks.") else target
    if target in ("embed.weight", "lm_head.weight"):
        return torch.arange(plan.vocab_start, plan.vocab_stop)
    if leaf in ("attn.qkv.weight", "attn.qkv.bias"):
        q, kv = config.num_heads * d, config.num_kv_heads * d
        return torch.cat([_span(plan.head_start, plan.heads, d), _span(plan.kv_start, plan.kv_heads, d, q),
                          _span(plan.kv_start, plan.kv_heads, d, q + kv)])
    if leaf in ("mlp.gate_up.weight", "mlp.gate_up.bias"):
        inter = config.intermediate_size
        return torch.cat([_span(plan.intermediate_start, plan.intermediate),
                          _span(plan.intermediate_start, plan.intermediate, offset=inter)])
    if leaf in ("mlp.up.weight", "mlp.up.bias"):
        return _span(plan.intermediate_start, plan.intermediate)
    return None


def owned_columns(target: str, plan: ShardPlan) -> tuple[int, int] | None:
    """Input columns [start, stop) of a row-parallel weight this rank holds (None: all)."""
    leaf = target.split(".", 2)[-1] if target.startswith("blocks.") else target
    if leaf == "attn.o_proj.weight":
        d = plan.config.head_dim
        return plan.head_start * d, (plan.head_start + plan.heads) * d
    if leaf == "mlp.down.weight":
        return plan.intermediate_start, plan.intermediate_start + plan.intermediate
    return None


def _runs(source_index: torch.Tensor, source_row: torch.Tensor) -> list[tuple[int, int, int]]:
    """(source, first row, stop row) for each maximal run of consecutive rows of one source."""
    if source_row.numel() == 0:
        return []
    breaks = torch.ones_like(source_row, dtype=torch.bool)
    breaks[1:] = (source_index[1:] != source_index[:-1]) | (source_row[1:] != source_row[:-1] + 1)
    starts = breaks.nonzero().flatten().tolist() + [source_row.numel()]
    return [(int(source_index[a]), int(source_row[a]), int(source_row[b - 1]) + 1) for a, b in zip(starts, starts[1:])]


class _Reader:
    """Slices of checkpoint tensors: ``get_slice`` where the source has it (safetensors);
    otherwise (GGUF, dequantized whole) the tensor is read once and sliced."""

    def __init__(self, source) -> None:
        self.source = source
        self.whole: dict[str, torch.Tensor] = {}

    def slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if hasattr(self.source, "read_slice"):
            return self.source.read_slice(name, dim, start, stop)
        if name not in self.whole:
            self.whole[name] = self.source.read(name)
        return self.whole[name].narrow(dim, start, stop - start).clone()


def read_shard(param: ParamSource, plan: ShardPlan, source) -> torch.Tensor:
    """This rank's part of ``param``, combined the way ``param.combine`` combines whole tensors."""
    reader = _Reader(source)
    rows, columns = owned_rows(param.target, plan), owned_columns(param.target, plan)
    if rows is None and columns is None:
        return param.combine([source.read(name) for name, _ in param.sources])
    if columns is not None:
        (name, _), = param.sources
        return reader.slice(name, 1, *columns)
    if param.row_order is not None:
        source_index, source_row = torch.zeros_like(rows), param.row_order[rows]
    else:
        bounds = torch.tensor([0] + [shape[0] for _, shape in param.sources]).cumsum(0)
        source_index = torch.bucketize(rows, bounds[1:], right=True)
        source_row = rows - bounds[source_index]
    parts = [reader.slice(param.sources[i][0], 0, a, b) for i, a, b in _runs(source_index, source_row)]
    rest = param.sources[0][1][1:]
    local = torch.cat(parts) if parts else torch.zeros(0, *rest)  # a rank with no real vocabulary rows
    if param.target in ("embed.weight", "lm_head.weight") and local.shape[0] < plan.vocab:
        local = torch.cat([local, local.new_zeros(plan.vocab - local.shape[0], *local.shape[1:])])
    return local
