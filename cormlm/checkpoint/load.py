"""``load_model``: checkpoint folder, hub id or GGUF file -> ready-to-run model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..models.transformer import CausalLM
from .gguf_file import gguf_checkpoint, is_gguf
from .hf_config import load_config
from .hub import resolve_checkpoint
from .layout import checkpoint_layout
from .tensors import ProgressCallback, SafetensorsSource, TensorSource, load_weights

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

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
               progress: ProgressCallback | None = None, tp: int | DeviceMesh | None = None) -> CausalLM:
    """Load a checkpoint (Hugging Face folder, hub id, or GGUF file) as an eval-mode model.

    The model is built on the meta device and filled tensor by tensor (GGUF tensors
    dequantized one at a time), so loading never holds two copies of the weights.

    ``tp`` (a number of ranks, or a 1-D DeviceMesh) loads this rank's shard for tensor
    parallelism: run one process per rank under ``torchrun``; each reads only its slice of
    each safetensors tensor (a GGUF tensor is dequantized whole, then sliced).
    """
    config, source = open_checkpoint(resolve_checkpoint(model, revision=revision, cache_dir=cache_dir))
    device = resolve_device(device)
    parallel = None
    if tp is not None and not (type(tp) is int and tp == 1):
        from ..parallel import ShardPlan, TensorParallel, rank_device, resolve_mesh
        if type(tp) is int and tp > 1:
            ShardPlan(config, tp, 0)  # a model that does not split fails before any process group
        device = rank_device(device)
        parallel = TensorParallel(resolve_mesh(tp, device), config)
    dtype = resolve_dtype(dtype, config.stored_dtype, device)
    if parallel is not None:
        parallel.check_same_checkpoint(checkpoint_fingerprint(config, source, dtype), str(source.where))
    with torch.device("meta"):
        net = CausalLM(config, parallel)
    load_weights(net, source, dtype, device, progress, None if parallel is None else parallel.plan)
    return net.eval()


def checkpoint_fingerprint(config: ModelConfig, source: TensorSource, dtype: torch.dtype) -> str:
    """What must be equal on every rank: config, tensor names and shapes, dtype, and a few
    bytes of data (the final norm, the first row of the first and of the last parameter
    read), so that two fine-tunes of one shape differ too."""
    from ..parallel import fingerprint

    names = sorted(source.names())
    plan = checkpoint_layout(config)
    probes = [param.sources[0][0] for param in plan if param.target == "final_norm.weight"]
    probes += [plan[0].sources[0][0], plan[-1].sources[0][0]]
    data = [_first_row(source, name).float().numpy().tobytes() for name in probes]
    return fingerprint(config, [(name, source.shape(name)) for name in names], dtype, *data)


def _first_row(source: TensorSource, name: str) -> torch.Tensor:
    """A 1-D tensor whole, else its first row (only that row read where the source can slice)."""
    if len(source.shape(name)) > 1 and hasattr(source, "read_slice"):
        return source.read_slice(name, 0, 0, 1)
    tensor = source.read(name)
    return tensor if tensor.dim() == 1 else tensor[:1]


def open_checkpoint(path: Path) -> tuple[ModelConfig, TensorSource]:
    """The config and tensors of a resolved checkpoint: a Hugging Face folder or a GGUF file."""
    if is_gguf(path):
        config, source, _ = gguf_checkpoint(path)
        return config, source
    return load_config(path), SafetensorsSource(path)
