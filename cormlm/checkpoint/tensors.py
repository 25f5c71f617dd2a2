"""Reading checkpoint tensors (safetensors, single or sharded; GGUF) into a model built on ``meta``.

The model is created without storage, then each parameter is read from its file, cast to
the requested dtype/device and assigned, one at a time: peak memory stays at the model's
size plus one tensor, never twice the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import CheckpointError, CheckpointNotFoundError
from .jsonfiles import read_json
from .layout import ParamSource, checkpoint_layout, is_ignorable

if TYPE_CHECKING:
    from ..parallel.plan import ShardPlan

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

ProgressCallback = Callable[[int, int], None]  # (tensors loaded, tensors in all)


def tensor_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the file that stores it."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'; re-download or re-save the checkpoint")
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointNotFoundError(f"{index} lists shard {shard.name}, which is missing from {folder}")
        return files
    candidates = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else sorted(folder.glob("*.safetensors"))
    if not candidates:
        legacy = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pth")]
        hint = (f" (found {', '.join(legacy)}: cormlm reads only safetensors; re-save with "
                "save_pretrained(safe_serialization=True))") if legacy else ""
        raise CheckpointNotFoundError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    files: dict[str, Path] = {}
    for path in candidates:
        with open_safetensors(path) as handle:
            for name in handle.keys():
                files[name] = path
    return files


def open_safetensors(path: Path):
    """``safe_open`` with a corrupt file reported by name."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-download it") from None


class TensorSource(Protocol):
    """Named checkpoint tensors in Hugging Face names and layout (safetensors shards, a GGUF file)."""

    where: Path  # the folder or file, for messages

    def names(self) -> Iterable[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str) -> torch.Tensor: ...
    def close(self) -> None: ...
    # optional: def read_slice(self, name, dim, start, stop) -> torch.Tensor (rows or columns
    # [start, stop) of a tensor without reading the rest; tensor parallelism uses it)


class SafetensorsSource:
    """The safetensors files of a checkpoint folder; open shard handles are reused across tensors."""

    def __init__(self, folder: Path) -> None:
        self.where = folder
        self.files = tensor_files(folder)
        self.handles: dict[Path, object] = {}

    def _handle(self, path: Path):
        if path not in self.handles:
            self.handles[path] = open_safetensors(path).__enter__()
        return self.handles[path]

    def names(self) -> Iterable[str]:
        return self.files.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        path = self.files[name]
        try:
            return self._handle(path).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"tensor '{name}' in {path} cannot be read ({exc}); re-download the file") from None

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (``dim`` 0) or columns (``dim`` 1) [start, stop) of a tensor: only those bytes are read."""
        path = self.files[name]
        try:
            view = self._handle(path).get_slice(name)
            return view[start:stop] if dim == 0 else view[:, start:stop]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"tensor '{name}' in {path} cannot be read ({exc}); re-download the file") from None

    def close(self) -> None:
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()


def _validate(plan: list[ParamSource], source: TensorSource, config) -> None:
    folder, available = source.where, set(source.names())
    missing, wrong = [], []
    for param in plan:
        for name, shape in param.sources:
            if name not in available:
                missing.append(f"{name} (expected shape {list(shape)})")
                continue
            found = source.shape(name)
            if found != shape:
                wrong.append(f"{name}: checkpoint has shape {list(found)}, the config implies {list(shape)}")
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{folder}: missing tensor(s) {'; '.join(missing[:5])}{more}")
    if wrong:
        raise CheckpointError(f"{folder}: shape mismatch for {'; '.join(wrong[:5])}; does the config match the weights?")
    used = {name for param in plan for name, _ in param.sources}
    unexpected = sorted(n for n in available if n not in used and not is_ignorable(config, n))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"{folder}: unexpected tensor(s) {', '.join(unexpected[:5])}{more}; the checkpoint does not match "
            f"its config (model_type '{config.family}')"
        )


def _assign(model: nn.Module, target: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = target.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


def load_weights(model: nn.Module, source: TensorSource, dtype: torch.dtype, device: torch.device,
                 progress: ProgressCallback | None = None, shard: ShardPlan | None = None) -> None:
    """Fill ``model`` (built on the meta device) from ``source``, one tensor at a time; with a
    ``shard`` plan, only this rank's slice of each tensor (``cormlm.parallel.shard``)."""
    config = model.config
    plan = checkpoint_layout(config)
    try:
        _validate(plan, source, config)
        for done, param in enumerate(plan, start=1):
            if shard is None:
                parts = [source.read(name).to(device=device, dtype=dtype) for name, _ in param.sources]
                _assign(model, param.target, param.combine(parts))
                del parts
            else:
                from ..parallel.shard import read_shard
                _assign(model, param.target, read_shard(param, shard, source).to(device=device, dtype=dtype))
            if progress is not None:
                progress(done, len(plan))
    finally:
        source.close()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.reset_derived_buffers()
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{source.where}: no checkpoint tensor fills parameter(s) {', '.join(left[:5])}")
