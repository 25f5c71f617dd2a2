"""One rank's view of a tensor-parallel model: its shard plan and the collectives the forward
pass, the cache and generation need.

Per forward pass: one all-reduce of the embedding (each rank looks up its vocabulary rows,
the others give zeros), one per block half (the row-parallel output projection and MLP
down projection; Falcon's parallel residual sums both halves first and reduces once), and
one all-gather of the last position's logits. When a KV head's query group spans ranks,
the cache adds one small collective per layer and step over the ranks sharing that head:
the group's attention for a policy that reads it (:meth:`TensorParallel.combine`), or the
state a policy computes from the keys themselves (knorm's norms, :meth:`TensorParallel.agree`).
Everything else (attention, the cache, every eviction decision) stays on the rank.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..config import ModelConfig
from .plan import ParallelError, ShardPlan

REDUCE_OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


class TensorParallel:
    """Rank ``rank`` of the 1-D ``mesh`` holding its shard of a model of ``config``."""

    def __init__(self, mesh: DeviceMesh, config: ModelConfig) -> None:
        self.mesh = mesh
        self.group = mesh.get_group()
        self.rank = mesh.get_local_rank()
        self.world = mesh.size()
        self.plan = ShardPlan(config, self.world, self.rank)
        self.peers = None  # process group of the ranks sharing this rank's (replicated) KV head
        self.peer_ranks: list[int] = []  # their global ranks
        if self.plan.kv_replicated:
            ranks = mesh.mesh.flatten().tolist()
            self.peer_ranks = [ranks[i] for i in self.plan.kv_peers()]
            self.peers = self.group if len(self.peer_ranks) == self.world else dist.new_group(
                self.peer_ranks, use_local_synchronization=True)

    # ------------------------------------------------------------------ forward pass
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial ``x`` (in place), the same on every rank."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's vocabulary shard of ``logits`` [..., V/N] side by side: [..., V]."""
        parts = [torch.empty_like(logits) for _ in range(self.world)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.plan.config.vocab_size]

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Group rank 0's ``x`` on every rank (sampled tokens: one choice for all)."""
        dist.broadcast(x, src=self.mesh.mesh.flatten()[0].item(), group=self.group)
        return x

    def broadcast_object(self, value: object) -> object:
        """Group rank 0's ``value`` (any picklable object) on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=self.mesh.mesh.flatten()[0].item(), group=self.group)
        return box[0]

    # ------------------------------------------------------------------ the cache
    def combine(self, probs: torch.Tensor, reduce: str | None) -> torch.Tensor:
        """Attention of the whole query group of a replicated KV head from this rank's share.

        ``probs`` [..., G/R, Q, S] (group at -3; R ranks share the head). With ``reduce``
        ("max" or "sum", as the policy declares) the group is reduced locally and across
        the R ranks in one all-reduce: [..., 1, Q, S]. Without, the ranks' shares are
        gathered: [..., G, Q, S], exactly the group one process would see.
        """
        if reduce is not None:
            local = probs.amax(dim=-3, keepdim=True) if reduce == "max" else probs.sum(dim=-3, keepdim=True)
            dist.all_reduce(local, op=REDUCE_OPS[reduce], group=self.peers)
            return local
        parts = [torch.empty_like(probs) for _ in range(self.plan.replicas)]
        dist.all_gather(parts, probs.contiguous(), group=self.peers)
        return torch.cat(parts, dim=-3)

    def agree(self, x: torch.Tensor) -> torch.Tensor:
        """The first of the ranks sharing this rank's KV head: its ``x`` on all of them."""
        x = x.contiguous()
        dist.broadcast(x, src=self.peer_ranks[0], group=self.peers)
        return x

    # ------------------------------------------------------------------ checks
    def check_same_checkpoint(self, fingerprint: str, where: str) -> None:
        """Fail on every rank, naming each rank's checkpoint, unless all ranks load the same one."""
        everyone: list[tuple[str, str] | None] = [None] * self.world
        dist.all_gather_object(everyone, (fingerprint, where), group=self.group)
        if len({f for f, _ in everyone}) > 1:
            lines = "; ".join(f"rank {i}: {w} ({f[:12]})" for i, (f, w) in enumerate(everyone))
            raise ParallelError(f"the ranks loaded different checkpoints or dtypes ({lines}); every rank must load the "
                                "same checkpoint with the same dtype")


def fingerprint(*parts: object) -> str:
    """A short digest of what a rank is about to load (config, tensor names and shapes, dtype)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
    return digest.hexdigest()
