"""Tensor parallelism: two CPU ranks (gloo, started by torchrun) against one process.

One torchrun run (tests/tp_cases.py) loads every checkpoint with ``tp=2`` and records
logits, greedy tokens and kept positions per rank; the same runs in this process are the
reference. Kept positions are compared per layer, batch row and KV head: a rank holds the
KV heads of its query heads (Llama GQA/MHA: half of them; Falcon-7B MQA: the one KV head,
on both ranks, whose policies must then see the whole query group).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import make_falcon_checkpoint, make_peaky_checkpoint, save_hf_model
from gguf_files import write_gguf
from tp_cases import CHECKPOINTS, NEW_TOKENS, OTHER, inputs, run_cases

import cormlm
from cormlm.parallel import ParallelError, ShardPlan, workable_world_sizes

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _write_checkpoints(root: Path) -> None:
    make_peaky_checkpoint(root / "llama-gqa", num_key_value_heads=2)
    make_peaky_checkpoint(root / OTHER, num_key_value_heads=2, seed=1)
    make_peaky_checkpoint(root / "llama-mha")
    make_falcon_checkpoint(root / "falcon-mqa", "7b")
    make_falcon_checkpoint(root / "falcon-rw", "rw")
    make_falcon_checkpoint(root / "falcon-new", "new")
    save_hf_model(root / "llama-tied", vocab_size=161, tie_word_embeddings=True, attention_bias=True,
                  mlp_bias=True, num_key_value_heads=2)
    write_gguf(root / "llama-gqa.gguf", root / "llama-gqa")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two ranks' results, this process's results)."""
    root = tmp_path_factory.mktemp("tp")
    _write_checkpoints(root)
    done = subprocess.run([*TORCHRUN, str(TESTS / "tp_cases.py"), str(root)], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(2)]
    return ranks, run_cases(root), root


def _whole(per_rank: list[list[list[torch.Tensor]]], kv_heads: int) -> list[list[torch.Tensor]]:
    """Per row, per KV head: positions of the whole model from the ranks' own KV heads."""
    local = len(per_rank[0][0])
    if local * 2 == kv_heads:  # KV heads split: rank 0's, then rank 1's
        return [a + b for a, b in zip(*per_rank)]
    for a, b in zip(*per_rank):  # replicated: both ranks hold the same head, and must keep the same keys
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    return per_rank[0]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_match_one_process(runs, name):
    ranks, single, _ = runs
    assert torch.equal(ranks[0][name]["logits"], ranks[1][name]["logits"])  # gathered: the same on every rank
    assert (ranks[0][name]["logits"] - single[name]["logits"]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", [name for name, (_, generated) in CHECKPOINTS.items() if generated])
def test_tokens_and_kept_positions_match_one_process(runs, name):
    ranks, single, root = runs
    config = cormlm.load_model(root / name).config
    for index, run in enumerate(CHECKPOINTS[name][1]):
        ours, reference = [r[name]["runs"][index] for r in ranks], single[name]["runs"][index]
        assert torch.equal(ours[0]["tokens"], reference["tokens"]) and torch.equal(ours[1]["tokens"], reference["tokens"])
        evicted = False
        seen = (inputs()[1].sum(dim=1) + NEW_TOKENS - 1).tolist()  # the last new token is never fed back
        for layer, expected in enumerate(reference["positions"]):
            got = _whole([ours[0]["positions"][layer], ours[1]["positions"][layer]], config.num_kv_heads)
            for row_got, row_expected, row_seen in zip(got, expected, seen):
                assert len(row_got) == config.num_kv_heads
                for head_got, head_expected in zip(row_got, row_expected):
                    assert torch.equal(head_got, head_expected), (run, layer)
                    evicted |= len(head_expected) < row_seen
        assert evicted, f"{run} evicted nothing on {name}: the comparison would be vacuous"


def test_sampled_tokens_are_rank_0s_on_every_rank(runs):
    ranks, _, _ = runs
    assert torch.equal(ranks[0]["errors_and_sampling"]["sampled"], ranks[1]["errors_and_sampling"]["sampled"])


def test_compile_and_disagreeing_checkpoints_are_refused_on_every_rank(runs):
    ranks, _, _ = runs
    for rank in ranks:
        found = rank["errors_and_sampling"]
        assert "not supported with tensor parallelism" in found["compile"]
        message = found["disagree"]
        assert "different checkpoints" in message and "llama-gqa " in message and OTHER in message, message


def test_heads_that_do_not_split_name_the_world_sizes_that_work(tmp_path):
    folder = make_peaky_checkpoint(tmp_path / "m", num_key_value_heads=2)
    with pytest.raises(ParallelError) as caught:
        cormlm.load_model(folder, tp=3)
    message = str(caught.value)
    assert "4 attention heads are not divisible by 3" in message and "with 1, 2, 4 rank(s)" in message


def test_tp_outside_torchrun_says_how_to_launch(tmp_path, monkeypatch):
    folder = make_peaky_checkpoint(tmp_path / "m", num_key_value_heads=2)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ParallelError, match="torchrun --nproc-per-node 2"):
        cormlm.load_model(folder, tp=2)


def test_shard_plans():
    from cormlm.config import ModelConfig

    mqa = ModelConfig("falcon", 160, 64, 2, num_heads=8, num_kv_heads=1, head_dim=8, intermediate_size=256,
                      max_position_embeddings=64)
    assert workable_world_sizes(mqa) == [1, 2, 4, 8]
    plan = ShardPlan(mqa, 4, 3)
    assert (plan.kv_replicated, plan.kv_heads, plan.kv_start, plan.heads, plan.head_start) == (True, 1, 0, 2, 6)
    gqa = mqa.replace(num_kv_heads=2, intermediate_size=96)  # KV head 1 on ranks 2, 3
    assert ShardPlan(gqa, 4, 3).kv_peers() == [2, 3] and ShardPlan(gqa, 2, 1).kv_replicated is False
    assert workable_world_sizes(gqa) == [1, 2, 4, 8] and workable_world_sizes(gqa.replace(num_kv_heads=4,
                                                                                          intermediate_size=24)) == [1, 2, 4, 8]
    assert workable_world_sizes(gqa.replace(intermediate_size=100)) == [1, 2, 4]


def test_cli_under_torchrun_prints_once():
    args = ["generate", "--max-new-tokens", "8", "--policy", "corm", "--window", "4", "--recent", "2", "def f(x):"]
    alone = subprocess.run([sys.executable, "-m", "cormlm", *args], capture_output=True, text=True, timeout=120, env=ENV)
    split = subprocess.run([*TORCHRUN, "-m", "cormlm", *args], capture_output=True, text=True, timeout=120, env=ENV)
    assert alone.returncode == 0 and split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == alone.stdout and alone.stdout.strip()
    assert split.stderr.count("cormlm: loaded") == 1 and "split over 2 ranks" in split.stderr
    assert split.stderr.count("new tokens") == 1 and "by rank 0 of 2" in split.stderr


def test_serve_under_torchrun_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "cormlm", "serve"], capture_output=True, text=True, timeout=60,
                          env={**ENV, "WORLD_SIZE": "2", "RANK": "1"})
    assert done.returncode == 2 and "start cormlm serve without torchrun" in done.stderr, done.stderr
