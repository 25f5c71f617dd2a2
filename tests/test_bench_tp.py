"""scripts/bench_tp.py --quick end to end: the machine named, a row per configuration and
policy with its ratio to the baseline, half the weights per rank, and the split's logits
within 1e-5 of one process's."""

import re

from script_runs import run_script


def test_quick_run_names_the_machine_and_halves_the_weights():
    done = run_script("bench_tp", "--quick")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("CPU: ") and "| configuration | policy | decode tok/s |" in out
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(("| 1 process", "| 2 ranks"))]
    assert len(rows) == 6 and rows[0][3] == "1.00x"
    split = [row for row in rows if row[0].startswith("2 ranks")]
    # exact equality is test_tensor_parallel's; here: the columns are there and the logits agree
    assert all(float(row[7]) <= 1e-5 and re.fullmatch(r"\d of 5", row[8]) for row in split), split
    weights = re.search(r"weights (\d\.\d+) of one process's", out)
    assert weights and abs(float(weights.group(1)) - 0.5) < 0.01
    assert re.search(r"one all-reduce of a token's hidden state \d+", out)
