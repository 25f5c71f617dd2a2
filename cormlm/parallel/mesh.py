"""From ``tp=`` (a world size or a 1-D DeviceMesh) to the mesh a model is sharded over.

A world size needs processes started by ``torchrun`` (or an initialised default process
group): the process group is created from torchrun's environment, with gloo on CPU and
NCCL on CUDA, and each CUDA rank takes the GPU of its LOCAL_RANK.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .plan import ParallelError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = "launch one process per rank with torchrun, e.g. torchrun --nproc-per-node 2 -m cormlm generate ..."


def backend_for(device: torch.device) -> str:
    """gloo for CPU tensors, NCCL for CUDA ones."""
    return "nccl" if device.type == "cuda" else "gloo"


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when not under torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ParallelError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; {LAUNCH_HINT}") from None


def rank_device(device: torch.device) -> torch.device:
    """A CUDA device without an index becomes this rank's GPU (LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ParallelError(f"this rank would use {device} but the machine has {count} GPU(s); NCCL needs one GPU "
                                f"per rank (it refuses two ranks on one GPU): start at most {count} process(es) per "
                                "machine, or split on CPU (device='cpu', gloo)")
        torch.cuda.set_device(device)
    return device


def init_from_environment(device: torch.device) -> None:
    """The default process group from torchrun's variables, unless one exists already."""
    if dist.is_initialized():
        return
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ParallelError(f"tensor parallelism needs a process group, but this process was not started by torchrun "
                            f"({', '.join(missing)} unset) and none is initialised; {LAUNCH_HINT}")
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend_for(device), **kwargs)


def shutdown() -> None:
    """End the process group at the end of a tensor-parallel run (every rank).

    Collects garbage first: with a DeviceMesh alive, torch 2.13's gloo sometimes leaves
    collective work in reference cycles, and freeing it during interpreter shutdown aborts
    the process ("terminate called without an active exception"); collected while the
    interpreter still runs, it goes quietly.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def resolve_mesh(tp: int | DeviceMesh, device: torch.device) -> DeviceMesh:
    """The 1-D mesh of ranks that share the model."""
    if isinstance(tp, DeviceMesh):
        if tp.ndim != 1:
            raise ParallelError(f"tp= takes a 1-D DeviceMesh (the tensor-parallel dimension), got {tp.ndim} dimensions "
                                f"{tp.mesh_dim_names or ''}; pass mesh['tp'] for a multi-dimensional mesh")
        if tp.device_type != device.type:
            raise ParallelError(f"the DeviceMesh is on '{tp.device_type}' but the model is loaded on '{device.type}'; "
                                "make them agree")
        return tp
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ParallelError(f"tp must be a positive number of ranks or a DeviceMesh, got {tp!r}")
    init_from_environment(device)
    world = dist.get_world_size()
    if world != tp:
        raise ParallelError(f"tp={tp} but {world} process(es) were started; start {tp} (torchrun --nproc-per-node {tp}) "
                            "or pass a DeviceMesh of the ranks to use")
    return init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
