"""Feed-forward blocks, chosen by ``ModelConfig.mlp``.

The gated MLP keeps gate and up projections in one fused matrix (one GEMM per token
instead of two); the loader concatenates the checkpoint's separate tensors.
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


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), as in Llama and Mistral."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``bias=False``: without the down projection's bias (see ``Linear.forward``)."""
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down(self.act(gate) * up, bias)


class PlainMLP(nn.Module):
    """down(act(up(x))), as in Falcon."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return self.down(self.act(self.up(x)), bias)


def make_mlp(config: ModelConfig) -> nn.Module:
    return GatedMLP(config) if config.mlp == "gated" else PlainMLP(config)
