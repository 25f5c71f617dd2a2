"""Which policy a CacheConfig names, and how to build the cache for a model."""

from __future__ import annotations

from collections.abc import Callable

from .base import KVCache
from .config import CORM_DEFAULT, SCISSORHANDS_WINDOW, STREAMING_SINK, CacheConfig
from .corm import CormPolicy
from .h2o import H2OPolicy
from .knorm import KNormPolicy
from .policy import EvictionPolicy
from .ragged import RaggedCache
from .scissorhands import ScissorhandsPolicy
from .streaming import StreamingPolicy

POLICY_CLASSES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (EvictionPolicy, CormPolicy, StreamingPolicy, H2OPolicy, ScissorhandsPolicy, KNormPolicy)}

_POLICIES: dict[str, Callable[[CacheConfig], EvictionPolicy]] = {
    "full": lambda cfg: EvictionPolicy(),
    "corm": lambda cfg: CormPolicy(window=cfg.window or CORM_DEFAULT,
                                   recent=CORM_DEFAULT if cfg.recent is None else cfg.recent),
    "streaming": lambda cfg: StreamingPolicy(sink=STREAMING_SINK if cfg.sink is None else cfg.sink,
                                             recent=cfg.recent, budget=cfg.budget),
    "h2o": lambda cfg: H2OPolicy(budget=cfg.budget, recent=cfg.recent),
    "scissorhands": lambda cfg: ScissorhandsPolicy(budget=cfg.budget, recent=cfg.recent,
                                                   window=cfg.window or SCISSORHANDS_WINDOW),
    "knorm": lambda cfg: KNormPolicy(budget=cfg.budget, recent=cfg.recent),
}


def available_policies() -> list[str]:
    return list(_POLICIES)


def policy_parameters(name: str) -> tuple[str, ...]:
    """The CacheConfig fields policy ``name`` reads."""
    return POLICY_CLASSES[name].parameters


def make_cache(model, cfg: CacheConfig | None = None, batch_size: int = 1) -> KVCache:
    """An empty cache for ``model`` (a cormlm model: its config, dtype and device) and
    ``batch_size`` rows, ruled by ``cfg``'s policy (default: full)."""
    config = model.config
    return build_cache(cfg or CacheConfig(), batch_size=batch_size, num_layers=config.num_layers,
                       num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                       dtype=model.dtype, device=model.device)


def build_cache(cfg: CacheConfig, *, batch_size: int, num_layers: int, num_kv_heads: int,
                head_dim: int, dtype, device) -> KVCache:
    return RaggedCache(_POLICIES[cfg.policy](cfg), block_size=cfg.block_size, prefill_chunk=cfg.prefill_chunk,
                       batch_size=batch_size, num_layers=num_layers, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, dtype=dtype, device=device)
