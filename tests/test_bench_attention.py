"""scripts/bench_attention.py end to end on a toy shape: the machine header, one table row per
(batch, context, implementation) with a positive time, SDPA as the 1.00x reference, pools
that hold every key, and one summary line per (batch, context, path)."""

import math
import os
import re

import pytest
from script_runs import cpu_line, run_script, table_rows

from cormlm import CacheConfig
from cormlm.cache import paged_kernel

BATCHES, CONTEXT, KV_HEADS = (1, 2), 40, 2
TOY = ["--batch", *BATCHES, "--contexts", CONTEXT, "--rounds", 3, "--warmup", 1, "--heads", 4, "--kv-heads", KV_HEADS,
       "--head-dim", 8]
PATHS = ("native", "tensor ops") if paged_kernel.available() else ("tensor ops",)
IMPLEMENTATIONS = ("dense-sdpa", *(f"{name} ({path})" for name in ("paged-full", "paged-corm-probs") for path in PATHS))
COLUMNS = ["batch", "context", "implementation", "blocks in pool", "µs per call", "vs dense SDPA"]


@pytest.fixture(scope="module")
def output() -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # toy tensors: one thread, kind to a busy machine
    done = run_script("bench_attention", *TOY, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_header_names_the_cpu_before_the_table(output):
    cpu_line(output)
    assert re.search(r"^- torch \S+; BLAS: ", output, re.MULTILINE)
    assert output.index("- CPU: ") < output.index("| batch |")


def test_one_row_per_batch_context_and_implementation(output):
    rows = table_rows(output, COLUMNS)
    keys = [(int(r["batch"]), int(r["context"]), r["implementation"]) for r in rows]
    assert sorted(keys) == sorted((b, CONTEXT, name) for b in BATCHES for name in IMPLEMENTATIONS)
    block = {"paged-full": CacheConfig("full").slots_per_block(), "paged-corm-probs": CacheConfig("corm").slots_per_block()}
    for row in rows:
        assert float(row["µs per call"]) > 0
        assert re.fullmatch(r"\d+\.\d\dx", row["vs dense SDPA"]), row
        if row["implementation"] == "dense-sdpa":
            assert row["vs dense SDPA"] == "1.00x" and row["blocks in pool"] == "-"
        else:  # the pool holds every stream's CONTEXT keys, in blocks of its policy's size
            streams = int(row["batch"]) * KV_HEADS
            size = block[row["implementation"].split(" (")[0]]
            assert int(row["blocks in pool"]) >= streams * math.ceil(CONTEXT / size)


def test_one_summary_line_per_batch_context_and_path(output):
    summary = re.findall(r"^- batch (\d+), context (\d+), (native|tensor ops): paged \d+\.\d\dx dense SDPA's time, "
                         r".* (\d+\.\d\d)x paged$", output, re.MULTILINE)
    assert [(int(b), int(c), path) for b, c, path, _ in summary] == [(b, CONTEXT, p) for b in BATCHES for p in PATHS]
    assert all(float(ratio) > 0 for *_, ratio in summary)


def test_the_kernels_prefetch_per_shape_is_printed(output):
    if not paged_kernel.available():
        pytest.skip("no C kernel here: no prefetch to choose")
    tail = output[output.index("cormlm decode attention's prefetch per pool shape"):]
    lines = re.findall(r"^- streams (\d+), up to \d+ blocks of \d+, group 2, head 8(, group-max probabilities)?, 1 threads: "
                       r"native, ((software|hardware) prefetch|prefetch still measuring \(\d+ of 18 calls\))$", tail, re.MULTILINE)
    assert {(int(s), bool(p)) for s, p, *_ in lines} == {(b * KV_HEADS, p) for b in BATCHES for p in (False, True)}, tail
