"""``load_model``: checkpoint folder, hub id or GGUF file -> ready-to-run model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..models.transformer import CausalLM
from .gguf_file import gguf_checkpoint, is_gguf
from .hf_config import load_config
from .hub import resolve_checkpoint
from .tensors import ProgressCallback, SafetensorsSource, TensorSource, load_weights

DTYPE_NAMES = {
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use device='cpu'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, stored: str | None, device: torch.device) -> torch.dtype:
    """None/"auto": float32 on CPU (fast and exact there), else the checkpoint's own dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use float32, bfloat16, float16 or float64")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPE_NAMES.get(str(stored), torch.bfloat16)
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16, float16 or float64")
    return DTYPE_NAMES[dtype]


def load_model(model: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, *, revision: str | None = None,
               cache_dir: str | os.PathLike | None = None,
               progress: ProgressCallback | None = None) -> CausalLM:
    """Load a checkpoint (Hugging Face folder, hub id, or GGUF file) as an eval-mode model.

    The model is built on the meta device and filled tensor by tensor (GGUF tensors
    dequantized one at a time), so loading never holds two copies of the weights.
    """
    config, source = open_checkpoint(resolve_checkpoint(model, revision=revision, cache_dir=cache_dir))
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, config.stored_dtype, device)
    with torch.device("meta"):
        net = CausalLM(config)
    load_weights(net, source, dtype, device, progress)
    return net.eval()


def open_checkpoint(path: Path) -> tuple[ModelConfig, TensorSource]:
    """The config and tensors of a resolved checkpoint: a Hugging Face folder or a GGUF file."""
    if is_gguf(path):
        config, source, _ = gguf_checkpoint(path)
        return config, source
    return load_config(path), SafetensorsSource(path)
