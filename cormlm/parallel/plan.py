"""Which heads, MLP columns and vocabulary rows one rank of a tensor-parallel group owns.

Pure arithmetic on the config (no process group here), so that the rules can be checked
and explained before anything is loaded:

- query heads split evenly: rank ``r`` of ``N`` owns ``Hq/N`` consecutive heads;
- KV heads split evenly when ``N`` divides ``Hkv``: a rank owns the KV heads of its query
  heads, and every eviction decision stays on the rank (nothing crosses ranks);
- otherwise, when ``Hkv`` divides ``N`` (MQA with one KV head, or fewer KV heads than ranks),
  each KV head is *replicated* on the ``N/Hkv`` ranks that share its query group; each of
  them holds the same ragged cache for it, and their policies read the whole group's
  attention through one small collective per layer and step (``TensorParallel.combine``);
- the MLP's intermediate columns split evenly;
- the vocabulary (embedding rows, LM head rows) splits in ``ceil(V/N)`` rows per rank, the
  last rank's shard padded with zero rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import ConfigError


class ParallelError(ConfigError):
    """A model or launch that tensor parallelism cannot split as asked."""


def workable_world_sizes(config: ModelConfig) -> list[int]:
    """Every number of ranks this model splits over (1 always works)."""
    return [n for n in range(1, config.num_heads + 1) if not _obstacles(config, n)]


def _obstacles(config: ModelConfig, world: int) -> list[str]:
    hq, hkv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
    problems = []
    if hq % world:
        problems.append(f"{hq} attention heads are not divisible by {world}")
    if hkv % world and world % hkv:
        problems.append(f"{hkv} KV heads neither divide into {world} ranks nor divide {world} (a KV head is "
                        "replicated only over whole groups of ranks)")
    if inter % world:
        problems.append(f"the MLP's {inter} intermediate columns are not divisible by {world}")
    return problems


@dataclass(frozen=True)
class ShardPlan:
    """Rank ``rank`` of ``world``: its slice of every sharded dimension of ``config``."""

    config: ModelConfig
    world: int
    rank: int

    def __post_init__(self) -> None:
        problems = _obstacles(self.config, self.world)
        if problems:
            sizes = ", ".join(map(str, workable_world_sizes(self.config)))
            raise ParallelError(
                f"cannot split this model over {self.world} ranks: {'; '.join(problems)}. Tensor parallelism works "
                f"for this model with {sizes} rank(s) (torchrun --nproc-per-node N)")

    # ------------------------------------------------------------------ attention heads
    @property
    def heads(self) -> int:
        """Query heads on this rank."""
        return self.config.num_heads // self.world

    @property
    def head_start(self) -> int:
        return self.rank * self.heads

    @property
    def kv_replicated(self) -> bool:
        """Whether a KV head's query group spans ranks (its cache then lives on each of them)."""
        return self.config.num_kv_heads % self.world != 0

    @property
    def kv_heads(self) -> int:
        """KV heads on this rank (one when replicated)."""
        return 1 if self.kv_replicated else self.config.num_kv_heads // self.world

    @property
    def kv_start(self) -> int:
        return self.rank // self.replicas if self.kv_replicated else self.rank * self.kv_heads

    @property
    def replicas(self) -> int:
        """Ranks holding each KV head (1 when KV heads split evenly)."""
        return self.world // self.config.num_kv_heads if self.kv_replicated else 1

    def kv_peers(self) -> list[int]:
        """Group ranks (0..N-1) sharing this rank's KV head, in query-head order."""
        first = self.kv_start * self.replicas
        return list(range(first, first + self.replicas))

    # ------------------------------------------------------------------ MLP and vocabulary
    @property
    def intermediate(self) -> int:
        return self.config.intermediate_size // self.world

    @property
    def intermediate_start(self) -> int:
        return self.rank * self.intermediate

    @property
    def vocab(self) -> int:
        """Rows of the embedding / LM head on every rank (the last one padded)."""
        return -(-self.config.vocab_size // self.world)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab

    @property
    def vocab_stop(self) -> int:
        """End of the real (unpadded) rows of this rank's shard."""
        return min(self.vocab_start + self.vocab, self.config.vocab_size)

    def local_config(self) -> ModelConfig:
        """The config the rank's modules are built from: its heads and MLP columns."""
        return self.config.replace(num_heads=self.heads, num_kv_heads=self.kv_heads,
                                   intermediate_size=self.intermediate)
