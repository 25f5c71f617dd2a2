"""scripts/bench_compile.py end to end on the embedded toy model (one option beside the default,
to keep the compiling short), and compile_model's check of the options it passes to inductor."""

import os
import re

import pytest
from script_runs import cpu_model_name, run_script

import cormlm
from cormlm.cache import paged_kernel
from cormlm.checkpoint.real_model import resolve_model_argument
from cormlm.errors import CormlmError

COLUMNS = ["variant", "warm-up s", "memory added MiB", "decode tok/s", "vs default"]


@pytest.fixture(scope="module")
def output() -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = run_script("bench_compile", "--quick", "--options", "freezing", env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_header_names_the_cpu_and_the_cache(output):
    name = cpu_model_name()
    header = output[:output.index("| variant |")]
    if name:
        assert name in header
    assert "inductor cache: a fresh folder" in header


def test_one_row_per_variant_with_the_default_as_reference(output):
    lines = output.splitlines()
    start = lines.index("| " + " | ".join(COLUMNS) + " |")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(COLUMNS, cells))
    # and the default with decode attention as inductor's tensor operations, where the kernel is built
    assert list(rows) == ["eager", "default", "size-checks", "freezing"] + ["attention-ops"] * paged_kernel.available()
    assert rows["default"]["vs default"] == "1.00x"
    for row in rows.values():
        if row["warm-up s"] == "failed":  # then its error is named below the table
            assert re.search(rf"^- {row['variant']} failed to compile: \w+", output, re.MULTILINE)
            continue
        # eager has nothing to compile: its warm-up of a toy model may round to 0.00 s
        assert float(row["warm-up s"]) >= (0 if row["variant"] == "eager" else 0.01)
        assert float(row["decode tok/s"]) > 0
        assert re.fullmatch(r"\d+\.\d\dx", row["vs default"])


def test_a_misspelt_inductor_option_is_one_clear_error():
    model = cormlm.load_model(resolve_model_argument("weights"))
    with pytest.raises(CormlmError, match=r"unknown inductor option\(s\) 'freezeing'.*freezing, cpp_wrapper, max_autotune"):
        cormlm.compile_model(model, options={"freezeing": True})
    assert not model.compiled
