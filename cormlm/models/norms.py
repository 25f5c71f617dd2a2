"""Normalisation layers, chosen by ``ModelConfig.norm``."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..config import ModelConfig
from .attention_ops import upcast

_p = ctypes.c_void_p
RMS_NORM = native.Kernel(Path(__file__).with_name("rms_norm.c"), "cormlm_rms_norm_f32",
                         [_p, _p, _p, _p, _p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float])
KERNEL_MAX_ROWS = 8  # decode batches: rows whose norm costs less than dispatching torch's operations


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, weight applied in the input dtype
    (the order Llama checkpoints were trained with, so bf16 results match)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_takes(x):
            return self._kernel(x, None)[1]
        dtype = x.dtype
        if dtype == torch.float32:  # the same arithmetic in one fused call (a decode step runs 60 of these)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = upcast(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def added(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x + delta`` and its norm (a residual stream and the next sublayer's input)."""
        if self._kernel_takes(x) and delta.shape == x.shape and delta.dtype is x.dtype and delta.is_cpu \
                and delta.is_contiguous():
            return self._kernel(x, delta)
        total = x + delta
        return total, self(total)

    def _kernel(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The C kernel on rows ``x`` (+ ``delta``): (the sum or None, its norm)."""
        total, y = None if delta is None else torch.empty_like(x), torch.empty_like(x)
        RMS_NORM.function()(x.data_ptr(), None if delta is None else delta.data_ptr(), self.weight.data_ptr(),
                            None if total is None else total.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1],
                            x.shape[-1], self.eps)
        return total, y

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        """An eager float32 CPU call on a few contiguous rows without gradients (inference),
        the C kernel built. (Checks cheapest first: this runs on every norm of a decode step.)"""
        w = self.weight
        return (not torch.compiler.is_compiling() and not torch.is_grad_enabled()
                and x.dtype is torch.float32 and w.dtype is torch.float32 and x.is_cpu and w.is_cpu
                and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1] and x.is_contiguous() and w.is_contiguous()
                and RMS_NORM.function() is not None)


def add_and_norm(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + delta`` and ``norm`` of it, in one call where the norm has one (:meth:`RMSNorm.added`)."""
    if isinstance(norm, RMSNorm):
        return norm.added(x, delta)
    total = x + delta
    return total, norm(total)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(config.hidden_size, config.norm_eps)
    if config.norm == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    raise ValueError(f"unknown norm '{config.norm}'")
