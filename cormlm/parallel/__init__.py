"""Tensor parallelism over ``torch.distributed``: one model split over the ranks of a 1-D
DeviceMesh, attention heads and MLP columns column-wise, output projections row-wise, the
vocabulary by rows, and each rank's ragged cache holding only its own KV heads.

    # torchrun --nproc-per-node 2 script.py
    model = cormlm.load_model(path, tp=2)   # or tp=DeviceMesh
    ...
    cormlm.parallel.shutdown()              # every rank, at the end

``plan`` says what each rank owns (and which world sizes work), ``mesh`` turns ``tp=`` into a
mesh (gloo on CPU, NCCL on CUDA), ``shard`` reads each rank's slice of the checkpoint,
``group`` holds the collectives, ``layers`` the vocabulary-sharded embedding.
"""

from .group import TensorParallel, fingerprint
from .mesh import backend_for, launched_world_size, rank_device, resolve_mesh, shutdown
from .plan import ParallelError, ShardPlan, workable_world_sizes

__all__ = ["ParallelError", "ShardPlan", "TensorParallel", "backend_for", "fingerprint", "launched_world_size",
           "rank_device", "resolve_mesh", "shutdown", "workable_world_sizes"]
