"""scripts/bench_serve.py --quick end to end: a server per policy, concurrent clients, the
machine named, one table row per policy, and every served answer equal to its solo run."""

import re

from script_runs import run_script


def test_quick_run_prints_the_machine_and_a_row_per_policy():
    done = run_script("bench_serve", "--quick")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("CPU: ") and "| policy | KV memory |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| full ", "| corm "))]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == "3MiB" and cells[2] == "4" and int(cells[4]) >= 1
        assert cells[-1] == "4/4", row  # batching and preemption changed no greedy answer
    assert re.search(r"CORM ran \d+\.\d\dx the requests at once", out)
