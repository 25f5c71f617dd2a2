"""Which policy a CacheConfig names, and how to build the cache for a model.

Policies register themselves (``EvictionPolicy.__init_subclass__``); this module makes sure
every module of the cache package was imported, and those that ``cormlm.policies`` entry
points name, so a policy defined in one new file is found with nothing else to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from importlib.metadata import entry_points

from ..errors import CacheConfigError
from .base import KVCache
from .config import CacheConfig
from .policy import POLICIES, EvictionPolicy
from .ragged import QueryGroup, RaggedCache

ENTRY_POINT_GROUP = "cormlm.policies"


@cache
def _discover() -> None:
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{module.name}")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a third party's module: say which one, not a traceback
            raise CacheConfigError(f"the {ENTRY_POINT_GROUP} entry point '{entry.name}' ({entry.value}) failed to "
                                   f"load: {type(exc).__name__}: {exc}; fix or uninstall the package that provides "
                                   "it") from None


def policy_class(name: str) -> type[EvictionPolicy]:
    _discover()
    return POLICIES[name]


def available_policies() -> list[str]:
    """Every registered policy name: the built-in ones first, then plugins in definition order."""
    _discover()
    return list(POLICIES)


def make_cache(model, cfg: CacheConfig | None = None, batch_size: int = 1) -> KVCache:
    """An empty cache for ``model`` (a cormlm model: its config, dtype and device) and
    ``batch_size`` rows, ruled by ``cfg``'s policy (default: full). A tensor-parallel rank's
    cache holds its own KV heads only."""
    config = getattr(model, "local_config", model.config)
    tp = getattr(model, "tp", None)
    return build_cache(cfg or CacheConfig(), batch_size=batch_size, num_layers=config.num_layers,
                       num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                       dtype=model.dtype, device=model.device, sliding_window=config.sliding_window,
                       query_group=tp if tp is not None and tp.plan.kv_replicated else None)


def build_cache(cfg: CacheConfig, *, batch_size: int, num_layers: int, num_kv_heads: int,
                head_dim: int, dtype, device, sliding_window: int | None = None,
                query_group: QueryGroup | None = None) -> KVCache:
    return RaggedCache(policy_class(cfg.policy).from_config(cfg), block_size=cfg.slots_per_block(sliding_window),
                       prefill_chunk=cfg.prefill_chunk, batch_size=batch_size, num_layers=num_layers,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device=device,
                       query_group=query_group)
