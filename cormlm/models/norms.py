"""Normalisation layers, chosen by ``ModelConfig.norm``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention_ops import upcast


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, weight applied in the input dtype
    (the order Llama checkpoints were trained with, so bf16 results match)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # the same arithmetic in one fused call (a decode step runs 60 of these)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = upcast(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(config.hidden_size, config.norm_eps)
    if config.norm == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    raise ValueError(f"unknown norm '{config.norm}'")
