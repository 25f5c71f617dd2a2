"""scripts/bench_linear.py end to end on toy shapes: the machine header, one row per kernel the
library can choose for each (rows, shape), F.linear as the 1.00x reference, exactly one kernel
kept per product, and bad arguments refused before anything runs."""

import os

import pytest
import torch
from script_runs import cpu_line, run_script, table_rows

from cormlm.models import linear

SHAPES, ROWS = ("16x8", "33x17"), (1, 3)
COLUMNS = ["rows", "product", "kernel", "µs per product", "GB/s of weight", "vs F.linear", "kept"]


@pytest.fixture(scope="module")
def output() -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = run_script("bench_linear", "--shapes", *SHAPES, "--rows", *ROWS, "--layers", 2, "--rounds", 8, env=env,
                      timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_header_names_the_cpu(output):
    assert "threads" in cpu_line(output)


def test_every_choosable_kernel_is_timed_once_per_product_and_one_is_kept(output):
    rows = table_rows(output, COLUMNS)
    for n in ROWS:
        for shape in SHAPES:
            out_features, in_features = map(int, shape.split("x"))
            with torch.inference_mode():
                expected = linear.candidates(torch.ones(n, in_features), torch.ones(out_features, in_features))
            these = [r for r in rows if r["rows"] == str(n) and r["product"] == shape]
            assert [r["kernel"] for r in these] == [linear.NAMES[name] for name in expected]
            assert next(r for r in these if r["kernel"] == "F.linear")["vs F.linear"] == "1.00x"
            assert all(float(r["µs per product"]) > 0 for r in these)
            assert sum(r["kept"] == "yes" for r in these) == 1
    assert output.count(" row") >= len(ROWS) * len(SHAPES)  # the summary names each product's kept kernel


@pytest.mark.parametrize("args, message", [(["--rows", "9"], "--rows must be between 1 and 8"),
                                           (["--shapes", "12by4"], "--shapes takes OUTxIN"),
                                           (["--rounds", "2"], "--rounds at least")])
def test_bad_arguments_are_usage_errors(args, message):
    done = run_script("bench_linear", *args, timeout=60)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
