"""scripts/evaluate.py: the --quick run end to end, and its metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from evaluate import edit_similarity, first_line

ROOT = Path(__file__).resolve().parent.parent


def test_edit_similarity():
    assert edit_similarity("return x", "return x") == 1.0
    assert edit_similarity("", "") == 1.0 and edit_similarity("abc", "") == 0.0
    assert edit_similarity("abcd", "abxd") == pytest.approx(2 * 3 / 8)  # LCS "abd"
    assert edit_similarity("kitten", "sitting") == pytest.approx(2 * 4 / 13)  # LCS "ittn"


def test_first_line():
    assert first_line("\n    return x\n    y = 2") == "return x"
    assert first_line("") == ""


def test_quick_run(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--quick", "--model", "weights",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {row["policy"]: row for row in result["rows"]}
    assert list(rows) == ["full", "corm", "streaming", "h2o", "scissorhands", "knorm"]
    assert rows["full"]["retained_fraction"] == 1.0
    corm = rows["corm"]
    assert 0.0 < corm["retained_fraction"] < 1.0 and corm["kv_bytes"] < rows["full"]["kv_bytes"]
    for policy in ("streaming", "h2o", "scissorhands", "knorm"):  # compared at corm's memory
        assert rows[policy]["params"]["budget"] == round(corm["retained_fraction"], 3)
        assert abs(rows[policy]["retained_fraction"] - corm["retained_fraction"]) < 0.03, policy
    for row in rows.values():
        assert 1.0 < row["perplexity"] < 8192 and 0.0 <= row["edit_similarity"] <= 1.0
        assert len(row["completions"]) == result["completion_samples"]
    table = (tmp_path / "results.md").read_text()
    assert "| policy | params | mean retained |" in table and table.count("\n| ") == 7
    for name in ("perplexity_vs_retained.png", "edit_similarity_vs_retained.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gqa_experiment_mha_copy_is_the_same_model(tmp_path):
    """(a) and (d) of scripts/gqa_experiment.py run on an MHA rewrite of the GQA model: same
    logits, four times the KV heads."""
    import torch
    from checkpoints import save_hf_model
    from gqa_experiment import write_mha_copy

    import cormlm

    gqa_folder = save_hf_model(tmp_path / "gqa", model_type="llama", num_attention_heads=4, num_key_value_heads=1)
    gqa = cormlm.load_model(gqa_folder)
    mha = cormlm.load_model(write_mha_copy(gqa_folder, tmp_path / "mha"))
    assert (mha.config.num_kv_heads, gqa.config.num_kv_heads) == (4, 1)
    ids = torch.randint(0, 100, (2, 30))
    with torch.inference_mode():
        assert (mha(ids) - gqa(ids)).abs().max().item() <= 1e-5


def test_missing_model_is_one_clear_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--quick", "--model",
                           str(tmp_path / "absent"), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "no such folder" in done.stderr and "Traceback" not in done.stderr
