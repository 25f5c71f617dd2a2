"""Feed-forward blocks, chosen by ``ModelConfig.mlp``.

The gated MLP keeps gate and up projections in one fused matrix (one GEMM per token
instead of two); the loader concatenates the checkpoint's separate tensors. A prompt (many
rows, inference) instead runs in chunks of rows, each chunk's gate and up as two products
on the halves of that matrix: no [tokens, 2 x intermediate] activation is made, whose
strided halves made the activation and product slower, and whose size (tens of MiB for a
long prompt) the allocator hands back to the system and faults in again on every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .linear import Linear

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
# The same activations in place, for a prompt's chunks: the activation then overwrites the
# gate's fresh product instead of mapping another [rows, intermediate] tensor (whose first
# touch costs page faults that were up to a tenth of a prompt's MLP time)
ACTIVATIONS_INPLACE = {
    "silu": lambda x: F.silu(x, inplace=True),
    "relu": torch.relu_,
}


# Rows per chunk of a prompt's MLP: as many as keep one [rows, intermediate] activation
# within CHUNK_BYTES (the allocator reuses blocks of this size instead of mapping fresh
# pages), at least CHUNK_MIN_ROWS (products of fewer rows run below the GEMM's speed).
CHUNK_BYTES = 4 * 2**20
CHUNK_MIN_ROWS = 128


def chunk_rows(intermediate: int, itemsize: int) -> int:
    """Rows per chunk: a power of two, so that the chunks share the linear layer's row bucket."""
    rows = max(CHUNK_MIN_ROWS, CHUNK_BYTES // (itemsize * intermediate))
    return 1 << (rows.bit_length() - 1)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), as in Llama and Mistral."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]
        self.act_inplace = ACTIVATIONS_INPLACE.get(config.activation, self.act)

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``bias=False``: without the down projection's bias (see ``Linear.forward``)."""
        if self._chunked(x):
            return self.added_to(None, x, bias)
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down(self.act(gate) * up, bias)

    def _chunked(self, x: torch.Tensor) -> bool:
        """A prompt under inference (not traced): run a chunk of rows at a time."""
        return x.numel() // x.shape[-1] > CHUNK_MIN_ROWS and not torch.is_grad_enabled() \
            and not torch.compiler.is_compiling()

    def added_to(self, residual: torch.Tensor | None, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``residual + self(x)``; a prompt's chunks are added into ``residual`` in place (a
        tensor the caller made for this, overwritten), so no output of all rows is gathered
        and added again."""
        if not self._chunked(x):
            return self(x, bias) if residual is None else residual + self(x, bias)
        flat = x.reshape(-1, x.shape[-1])
        out = None if residual is None else residual.view(-1, residual.shape[-1])
        step, i = chunk_rows(self.intermediate, x.element_size()), self.intermediate
        outs = []
        for start in range(0, flat.shape[0], step):
            chunk = flat[start:start + step]
            hidden = self.act_inplace(self.gate_up.part(chunk, 0, i)).mul_(self.gate_up.part(chunk, i, 2 * i))
            if out is None:
                outs.append(self.down(hidden, bias))
            else:
                out[start:start + step] += self.down(hidden, bias)
        if out is None:
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.view(*x.shape[:-1], -1)


class PlainMLP(nn.Module):
    """down(act(up(x))), as in Falcon."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return self.down(self.act(self.up(x)), bias)

    def added_to(self, residual: torch.Tensor, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return residual + self(x, bias)


def make_mlp(config: ModelConfig) -> nn.Module:
    return GatedMLP(config) if config.mlp == "gated" else PlainMLP(config)
