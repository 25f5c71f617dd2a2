"""What the tensor-parallel tests run on every rank, and the same runs in one process.

``torchrun --standalone --nproc-per-node 2 tests/tp_cases.py ROOT`` loads each checkpoint
under ROOT with ``tp=2`` and saves, per rank, what ``run_cases`` returns to ROOT/rank{N}.pt;
``tests/test_tensor_parallel.py`` runs ``run_cases`` in its own process (no ``tp``) and
compares. ROOT holds the checkpoints ``CHECKPOINTS`` names (written by the test).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import cormlm
import cormlm.parallel
from cormlm.cache.corm import CormPolicy

# name -> (what it is, the generation runs on it)
CORM = dict(policy="corm", window=8, recent=4)
CHECKPOINTS = {
    "llama-gqa": ("Llama, 4 heads, 2 KV heads (one per rank)", [CORM]),
    "llama-mha": ("Llama, 4 heads, 4 KV heads", [CORM]),
    # Falcon-7B's layout: one KV head, replicated on both ranks, each with 2 of its 4 query heads
    "falcon-mqa": ("Falcon-7B MQA", [dict(CORM, group_reduce="max"), dict(CORM, group_reduce=None),
                                     dict(CORM, magnitude=1.0, budget=14),  # keep_until through the max
                                     dict(policy="h2o", budget=12, recent=4),
                                     dict(policy="scissorhands", budget=12, recent=4, window=8),
                                     dict(policy="knorm", budget=12, recent=4)]),
    "falcon-rw": ("Falcon-RW: interleaved QKV, ALiBi, biases", []),
    "falcon-new": ("Falcon-40B layout: grouped QKV, 2 KV heads", []),
    "llama-tied": ("Llama, tied embeddings, 161-token vocabulary (uneven shards), biases", []),
    "llama-gqa.gguf": ("llama-gqa as a GGUF file: each tensor dequantized whole, then sliced", []),
}
OTHER = "llama-gqa-other"  # same shapes as llama-gqa, other weights
NEW_TOKENS = 12


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the first left-padded by 5 tokens."""
    ids = torch.randint(0, 160, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    return ids, mask


def _generate(model, run: dict) -> dict:
    """Greedy tokens and kept positions (per layer, row, local KV head) of one generation."""
    run = dict(run)
    reduce = run.pop("group_reduce", "declared")
    had, saved = "group_reduce" in CormPolicy.__dict__, CormPolicy.__dict__.get("group_reduce")
    if reduce != "declared":  # this process only: the max all-reduce or the gather, whatever corm.py declares
        CormPolicy.group_reduce = reduce
    try:
        ids, mask = inputs()
        out = cormlm.generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                              cache=cormlm.CacheConfig(**run), eos_token_id=[])
    finally:
        if reduce != "declared":
            if had:
                CormPolicy.group_reduce = saved
            else:
                del CormPolicy.group_reduce
    positions = [out.cache.positions(layer) for layer in range(model.config.num_layers)]
    return {"tokens": out.tokens, "positions": positions}


def run_cases(root: Path, tp: int | None = None) -> dict:
    torch.set_num_threads(1)
    results = {}
    for name, (_, runs) in CHECKPOINTS.items():
        model = cormlm.load_model(root / name, tp=tp)
        ids, mask = inputs()
        with torch.inference_mode():
            logits = model(ids, attention_mask=mask)
        results[name] = {"logits": logits, "runs": [_generate(model, run) for run in runs]}
    return results


def errors_and_sampling(root: Path) -> dict:
    """Under torchrun only: the errors a split model gives, and sampled tokens on every rank."""
    rank = int(os.environ["RANK"])
    found = {}
    model = cormlm.load_model(root / "llama-gqa", tp=2)
    ids, _ = inputs()
    sampled = cormlm.generate(model, ids, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=rank, eos_token_id=[])
    found["sampled"] = sampled.tokens  # different seeds: equal only if every rank takes rank 0's choice
    try:
        cormlm.compile_model(model)
    except cormlm.CormlmError as exc:
        found["compile"] = str(exc)
    try:  # rank 1 loads other weights of the same shapes
        cormlm.load_model(root / ("llama-gqa" if rank == 0 else OTHER), tp=2)
    except cormlm.ConfigError as exc:
        found["disagree"] = str(exc)
    return found


if __name__ == "__main__":
    root = Path(sys.argv[1])
    results = run_cases(root, tp=2)
    results["errors_and_sampling"] = errors_and_sampling(root)
    torch.save(results, root / f"rank{os.environ['RANK']}.pt")
    cormlm.parallel.shutdown()
