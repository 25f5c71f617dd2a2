"""The policy interface: what a baseline must implement to rule the ragged cache.

A policy never sees storage layout. It turns attention probabilities into per-key
observations (``observe``), folds them into per-slot state (``merge``) and says which slots
to drop (``evict``). The cache calls ``observe`` on whatever layout it has at hand
(prefill: dense [B, Hkv, G, Q, S]; decode: pool blocks [NB, G, 1, block], G = 1 when the
policy declares ``group_reduce``), always with the query-group dimension at -3, the query
dimension at -2 and keys last.

Budget policies (h2o, scissorhands, knorm) rank keys and drop the lowest-ranked beyond a
budget: ``budget.BudgetPolicy`` owns ``budget`` and ``recent`` and ranks each stream once for
all of them; a budget policy only says which keys go first (``priority``).

A policy class registers itself under its ``name`` when it is defined; ``parameters``,
``defaults`` and ``help`` say which CacheConfig fields it reads, what they mean to it and
their values when unset, and ``check`` rejects combinations it cannot run with, so adding
a policy is one new file (a module in this package, or any module named by a
``cormlm.policies`` entry point) and the command line's flags describe it.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

POLICIES: dict[str, type[EvictionPolicy]] = {}  # name -> class, filled as policy classes are defined


def group_max(x: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Max over ``dim`` (kept, size 1) by pairwise maxima of overlapping halves: ceil(log2 n)
    elementwise operations. A query group is a short middle dimension, over which CPU
    reduction kernels run several times slower than elementwise ones; the result is exact."""
    while (n := x.shape[dim]) > 1:
        half = (n + 1) // 2  # the halves overlap by one row when n is odd: harmless for a max
        x = torch.maximum(x.narrow(dim, 0, half), x.narrow(dim, n - half, half))
    return x


def group_max_(x: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """:func:`group_max` written over the first entry of ``dim`` of ``x`` and returned as a view
    of it (size 1 kept): no new tensor, for scores that are scratch anyway."""
    first = x.narrow(dim, 0, 1)
    for i in range(1, x.shape[dim]):
        torch.maximum(first, x.narrow(dim, i, 1), out=first)
    return first


@dataclass
class SlotView:
    """One layer's pool as a policy sees it at eviction time (all [NB, block] unless noted)."""

    positions: torch.Tensor  # 0-indexed positions, -1 = empty slot
    state: dict[str, torch.Tensor]  # the policy's per-slot state
    query_t: torch.Tensor  # [NB, 1]: 1-indexed position of the owning stream's latest query
    owner: torch.Tensor  # [NB]: stream (row * Hkv + head) owning each block, -1 = free
    stream_t: torch.Tensor  # [S]: 1-indexed position of each stream's latest query (0 = none yet)
    single_step: bool = False  # one new key per stream since the last eviction (a decode step)


class EvictionPolicy(ABC):
    """Base policy: keeps everything. Subclasses override what they need."""

    name: ClassVar[str] = "full"
    # CacheConfig fields the policy reads; setting any other is an error, never a silent no-op
    parameters: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}  # values of parameters the user left unset
    help: ClassVar[dict[str, str]] = {}  # parameter -> what it means to this policy (CLI help)
    needs_probs: ClassVar[bool] = False
    needs_attended: ClassVar[bool] = False  # observe() reads ``attended`` (costs a count per decode step)
    # When tensor parallelism splits a KV head's query group over ranks, how the group's heads
    # may be combined before observe() reads them: "max" (observe only asks whether some head
    # gives a key at least a threshold: any(p >= x) == max(p) >= x), "sum" (observe adds the
    # heads' probabilities), or None: the ranks' shares are gathered whole (exact for any
    # policy, at group-size times the traffic of one reduced row). Decode attention also
    # hands a policy that declares a reduction its group already reduced ([NB, 1, 1, block]).
    group_reduce: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        from ..errors import CacheConfigError

        if cls.group_reduce not in (None, "max", "sum"):  # read as a reduction, never silently ignored
            raise CacheConfigError(f"{cls.__module__}.{cls.__qualname__}.group_reduce must be 'max', 'sum' or None, "
                                   f"got {cls.group_reduce!r}")
        if cls.group_reduce == "sum" and cls.reads_log_probs():  # sums of logarithms are no sum of probabilities
            raise CacheConfigError(f"{cls.__module__}.{cls.__qualname__} reads log-probabilities (observe_log), "
                                   f"which tensor-parallel ranks cannot combine by 'sum': use 'max' or None")
        if "name" in cls.__dict__:
            taken = POLICIES.get(cls.name)
            if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
                raise CacheConfigError(f"policy name '{cls.name}' of {cls.__module__}.{cls.__qualname__} is taken by "
                                       f"{taken.__module__}.{taken.__qualname__}; give the new policy another name")
            POLICIES[cls.name] = cls

    @classmethod
    def check(cls, given: dict[str, Any]) -> None:
        """Raise CacheConfigError for parameter values this policy cannot run with; ``given``
        holds the parameters as the user set them (None = unset). Types and ranges common to
        every policy are checked by CacheConfig first."""

    @classmethod
    def from_config(cls, cfg) -> EvictionPolicy:
        """The policy a CacheConfig asks for: its ``parameters``, unset ones from ``defaults``."""
        values = {name: getattr(cfg, name) for name in cls.parameters}
        return cls(**{name: cls.defaults.get(name) if value is None else value for name, value in values.items()})

    def state_fields(self) -> dict[str, tuple[torch.dtype, float]]:
        """Per-slot state: name -> (dtype, value of a freshly stored key)."""
        return {}

    def query_rows(self, num_queries: int) -> int:
        """How many of a multi-token call's last queries the policy must score."""
        return 0

    def observe(self, probs: torch.Tensor, query_t: torch.Tensor, attended: torch.Tensor | None,
                visible: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Reduce probabilities [..., G, Q, S] to per-key [..., S].

        ``query_t`` [..., Q] is each query's 1-indexed position (0 = padding), ``attended``
        [..., Q] how many keys it attended to (its own included; None unless the policy
        sets ``needs_attended``) and ``visible``
        [..., Q, S] which keys it could see (None: all held keys, as in decoding).
        """
        return {}

    def observe_log(self, log_probs: torch.Tensor, query_t: torch.Tensor, attended: torch.Tensor | None,
                    visible: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``observe`` given natural-log probabilities (-inf for hidden keys). A multi-token
        call hands its scored rows here instead when the policy overrides it (a threshold test
        reads a logarithm as well as a probability): the cache then skips the softmax over
        them wherever SDPA gave each row's log-sum-exp. ``log_probs`` is scratch: the policy
        may overwrite it."""
        return self.observe(log_probs.exp_(), query_t, attended, visible)

    @classmethod
    def reads_log_probs(cls) -> bool:
        """Whether multi-token calls hand the policy log-probabilities (it overrides observe_log)."""
        return cls.observe_log is not EvictionPolicy.observe_log

    def merge(self, state: dict[str, torch.Tensor], observed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New values of the observed slots' state fields (same shapes as ``observed``)."""
        return {}

    def decode_update(self, state: dict[str, torch.Tensor], probs: torch.Tensor, query_t: torch.Tensor,
                      attended: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """A decode step's ``observe`` then ``merge`` over pool blocks: ``probs`` [NB, G, 1, block],
        ``query_t`` and ``attended`` [NB, 1]; returns the new ``state`` (a policy may fuse the two
        when one query per stream allows it, with the same result)."""
        return self.merge(state, self.observe(probs, query_t, attended, None))

    def native_decode_step(self, state: dict[str, torch.Tensor], probs: torch.Tensor, positions: torch.Tensor,
                           query_t: torch.Tensor, layer_of_row: torch.Tensor, layers: int,
                           window: int | None) -> list[int] | None:
        """An eager decode step's :meth:`decode_update`, then :meth:`evict` and the sliding
        ``window``, over every layer's slots (``positions`` [rows, block], ``layer_of_row``) in
        one native pass, in place; returns each layer's live keys, or None where the policy
        has no such pass (the tensor operations run)."""
        return None

    def stored(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """State of freshly stored keys [..., D] computed from the keys themselves ([...])."""
        return {}

    def evict(self, view: SlotView) -> torch.Tensor | None:
        """Bool [NB, block]: slots to drop now (None = nothing)."""
        return None

    @classmethod
    def can_evict(cls) -> bool:
        """Whether the policy ever drops a key (it overrides ``evict``); the full cache does not."""
        return cls.evict is not EvictionPolicy.evict


POLICIES[EvictionPolicy.name] = EvictionPolicy
