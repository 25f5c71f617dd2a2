"""scripts/bench_decode.py end to end on a toy random checkpoint: the machine header, one table
row per implementation with ratios and KV held against retained, and the GEMV choices."""

import os
import re

import pytest
import torch
from script_runs import cpu_family, cpu_model_name, run_script

from cormlm.cache import paged_kernel
from cormlm.models.linear import NAMES

pytest.importorskip("transformers")

TOY = ["--model", "random", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
       "--intermediate", "128", "--vocab", "256", "--contexts", "32", "--repeats", "1", "--prefills", "2", "--steps", "2",
       "--no-compile", "--bandwidth-gib", "0.0625", "--pack-weights"]
IMPLEMENTATIONS = ("transformers", "cormlm-full", "cormlm-corm", "cormlm-full-packed", "cormlm-corm-packed")


@pytest.fixture(scope="module")
def output():
    env = {k: v for k, v in os.environ.items() if k != "CORMLM_LINEAR_KERNEL"}  # let the linear layer measure
    env["OMP_NUM_THREADS"] = "1"  # a toy model: one thread is fastest, and kind to a busy machine
    done = run_script("bench_decode", *TOY, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_header_names_the_cpu_and_blas(output):
    cpu = next(line for line in output.splitlines() if line.startswith("- CPU: "))
    name = cpu_model_name()
    if name:
        assert name in cpu
    assert "threads" in cpu and "cores" in cpu
    assert re.search(r"^- ISA: .*torch CPU capability \S+", output, re.MULTILINE)
    identity = next(line for line in output.splitlines() if line.startswith("- CPU identity: "))
    family = cpu_family()
    if family:  # one model name covers several generations: the family tells them apart
        assert f"family {family}" in identity
    blas = next(line for line in output.splitlines() if re.match(r"- torch \S+; BLAS: ", line))
    assert torch.__version__ in blas
    assert "(torch reports none)" not in blas
    info = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    if info:
        assert f"BLAS_INFO={info.group(1)}" in blas
    assert "oneDNN (mkldnn) available: " in blas
    # the header comes before the first table
    assert output.index("- CPU: ") < output.index("| context |")


def test_one_row_per_implementation_with_ratios_and_kv_held_against_retained(output):
    lines = output.splitlines()
    header = next(line for line in lines if line.startswith("| context |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns.count("vs transformers") == 2  # prefill and decode
    for name in ("KV MiB held", "retained KV MiB", "held / retained", "peak MiB", "of bandwidth limit"):
        assert name in columns
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| 32 |"):
            assert len(cells) == len(columns), line
            rows[cells[2]] = dict(zip(columns, cells))
    assert set(rows) == set(IMPLEMENTATIONS)
    for name, row in rows.items():
        assert row["mode"] == "eager"
        assert re.fullmatch(r"\d+\.\d\dx", row["vs transformers"])
        assert float(row["decode tok/s"]) > 0 and float(row["KV MiB held"]) > 0
        if name == "transformers":
            assert row["vs transformers"] == "1.00x"
            assert row["held / retained"] == "-" and row["retained KV MiB"] == "-"
        else:
            # 2 layers x 2 kv heads x 36 tokens (32 prompt + 2 warm-up + 2 timed steps) x key + value
            # x head_dim 16 x 4 bytes: a full cache (and CORM under its window) retains them all
            retained = 2 * 2 * (32 + 2 + 2) * 2 * 16 * 4 / 2**20
            assert float(row["retained KV MiB"]) == pytest.approx(retained, abs=1e-3)
            assert float(row["held / retained"]) >= 1.0  # storage holds at least the retained keys + values
            assert row["retained"] == "100.0%"


def test_kernel_choices_are_printed(output):
    tail = output[output.index("linear-layer kernel per product shape"):]
    kernel = "|".join(re.escape(name) for name in NAMES.values())  # any kernel the trials may choose
    choices = re.findall(rf"^- (\d+)x(\d+), 1 row, float32, 1 threads: ({kernel})$", tail, re.MULTILINE)
    assert choices, tail
    assert (256, 64) in {(int(o), int(i)) for o, i, _ in choices}  # the LM head: vocab x hidden, one row


def test_decode_attention_choices_are_printed(output):
    tail = output[output.index("cormlm decode attention per shape"):]
    native = paged_kernel.available() and os.environ.get(paged_kernel.FORCE_ENV, "").strip().lower() != "torch"
    in_graphs = "the C kernel" if native else "the tensor operations, fused"  # what compiled steps call
    assert f"compiled graphs here: {in_graphs})" in tail.splitlines()[0]
    lines = re.findall(r"^- streams (\d+), up to (\d+) blocks of (\d+), group (\d+), head (\d+)(, [a-z -]*probabilities)?, "
                       r"1 threads: (native, (software|hardware) prefetch|native, prefetch still measuring \(\d+ of 18 calls\)"
                       r"|torch)$", tail, re.MULTILINE)
    assert lines or "native kernel unavailable" in tail, tail


def test_prompt_attention_choices_are_printed(output):
    tail = output[output.index("cormlm prompt attention per shape"):]
    lines = re.findall(r"^- batch 1, (\d+) heads over (\d+), up to 32 positions, head (\d+)(, .+)?, 1 thread: "
                       r"(native|sdpa|still measuring \(\d+ of 18 calls\))$", tail, re.MULTILINE)
    assert lines or "native kernel unavailable" in tail, tail


def test_prompt_block_choices_are_printed(output):
    """--no-compile: no compiled model's prompt ran, and the list says so."""
    tail = output[output.index("cormlm compiled models' prompt blocks per half and shape"):]
    assert tail.splitlines()[1] == "- (none measured: no compiled model's prompt ran)"


def test_bandwidth_is_sampled_in_every_repeat(output):
    """The share of the bandwidth limit is taken against samples from its own repeat: one
    figure per repeat and context is printed after each table (--repeats 1, --contexts 32)."""
    line = next(line for line in output.splitlines() if line.startswith("Read bandwidth sampled between decode rounds"))
    figures = re.findall(r"(\d+): ([\d.]+(?: / [\d.]+)*) GB/s", line)
    assert [context for context, _ in figures] == ["32"]
    assert all(float(b) > 0 for b in figures[0][1].split(" / ")) and len(figures[0][1].split(" / ")) == 1
    share = [c.strip() for c in next(line for line in output.splitlines() if line.startswith("| 32 |")).split("|")]
    assert re.fullmatch(r"\d+%", share[-3])


@pytest.mark.parametrize("size", ["0", "-1"])
def test_a_bandwidth_probe_of_no_size_is_refused_before_anything_loads(size):
    done = run_script("bench_decode", "--bandwidth-gib", size, timeout=120)
    assert done.returncode == 2
    assert "--bandwidth-gib must be a size in GiB above 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_block_choices_are_printed(output):
    tail = output[output.index("cormlm block dense work per block shape"):]
    lines = re.findall(r"^- hidden 64, heads \d+ / \d+ of \d+, MLP \d+, \d rows?, 1 threads: (C calls|modules)$", tail,
                       re.MULTILINE)
    assert lines or "- (none measured: no eager decode step of a fitting block ran)" in tail, tail


def test_each_repeats_share_is_printed(output):
    """Each implementation's share of the bandwidth limit per repeat (the table shows their
    median): a repeat on a fast-memory minute reads apart from one on a slow minute."""
    line = next(line for line in output.splitlines() if line.startswith("Share of the bandwidth limit in each repeat"))
    context, entries = line.split("): ", 1)[1].split(": ", 1)
    shares = dict(entry.rsplit(" ", 1) for entry in entries.split(", "))
    assert context == "32" and set(shares) == set(IMPLEMENTATIONS), line
    assert all(re.fullmatch(r"\d+%", share) for share in shares.values()), line  # --repeats 1: one each
