"""scripts/evaluate.py: the --quick run end to end, and its metrics."""

from __future__ import annotations

import json

import pytest
import torch
from evaluate import ANSWER_TOKENS, KEY_LINE, QUESTION, QUICK, edit_similarity, first_line, first_number, passkey_prompts
from script_runs import run_script


def test_edit_similarity():
    assert edit_similarity("return x", "return x") == 1.0
    assert edit_similarity("", "") == 1.0 and edit_similarity("abc", "") == 0.0
    assert edit_similarity("abcd", "abxd") == pytest.approx(2 * 3 / 8)  # LCS "abd"
    assert edit_similarity("kitten", "sitting") == pytest.approx(2 * 4 / 13)  # LCS "ittn"


def test_first_line():
    assert first_line("\n    return x\n    y = 2") == "return x"
    assert first_line("") == ""


def test_first_number():
    assert first_number(" 41816.\n") == "41816" and first_number("41816") == "41816"
    assert first_number(" a special key 41816") == ""


def test_passkey_prompts_hold_the_key_at_the_asked_depth():
    class Tok:  # one id per character: lengths and places are easy to check
        bos_token_id = 0

        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    sizes = QUICK
    stream = [ord("x")] * 5000
    for case in passkey_prompts(Tok(), stream, 400, sizes):
        ids = case["ids"]
        assert len(ids) + ANSWER_TOKENS == 400 and ids[0] == 0
        text = "".join(map(chr, ids[1:]))
        assert text.endswith(QUESTION) and KEY_LINE.format(key=case["key"]) in text
        assert text.index(KEY_LINE.format(key=case["key"])) + len(KEY_LINE.format(key=case["key"])) == \
            len(text) - len(QUESTION) - sizes.passkey_depth


def test_quick_run(tmp_path):
    done = run_script("evaluate", "--quick", "--model", "weights", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {row["policy"]: row for row in result["rows"]}
    assert list(rows) == ["full", "corm", "streaming", "h2o", "scissorhands", "knorm"]
    assert rows["full"]["retained_fraction"] == 1.0
    corm = rows["corm"]
    assert 0.0 < corm["retained_fraction"] < 1.0 and corm["kv_bytes"] < rows["full"]["kv_bytes"]
    layers = len(corm["retained_by_head"])
    assert layers > 1 and all(0.0 < f <= 1.0 for layer in corm["retained_by_head"] for f in layer)
    for policy in ("streaming", "h2o", "scissorhands", "knorm"):  # compared at corm's memory
        assert rows[policy]["params"]["budget"] == round(corm["retained_fraction"], 3)
        assert rows[policy]["matched_to"] == "corm " + result["sizes"]["corm"][0]
        assert abs(rows[policy]["retained_fraction"] - corm["retained_fraction"]) < 0.03, policy
    for row in rows.values():
        assert 1.0 < row["perplexity"] < 8192 and 0.0 <= row["edit_similarity"] <= 1.0
        assert 0.0 <= row["passkey"] <= 1.0
        tasks = [answer["task"] for answer in row["answers"]]
        assert tasks.count("passkey") == result["sizes"]["passkey_cases"] and tasks.count("lines") >= 1
    table = (tmp_path / "results.md").read_text()
    assert "| policy | params | at the memory of |" in table and table.count("\n| ") == 7
    for name in ("quality_vs_kv_bytes.png", "corm_retained_by_head.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_on_the_real_model(tmp_path, smollm2_gguf):
    done = run_script("evaluate", "--quick", "--model", smollm2_gguf, "--tasks", "perplexity", "passkey", "--out",
                      tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    full = rows[0]
    assert full["policy"] == "full" and full["perplexity"] < 20  # a trained model on code: far below the toy's
    assert all(len(r["retained_by_head"]) == 30 and len(r["retained_by_head"][0]) == 3 for r in rows)


def test_query_similarity_quick(tmp_path):
    done = run_script("query_similarity", "--quick", "--model", "weights", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "query_similarity.json").read_text())
    assert len(result["layers"]) == 6
    measurable = [d < result["tokens"] for d in result["distances"]]  # no pair of queries that far apart: NaN
    for layer in result["layers"]:
        for cosines in (layer["cosine_raw"], layer["cosine_rotated"]):
            assert all(-1.0 <= c <= 1.0 if ok else c != c for c, ok in zip(cosines, measurable))
        recall, lost = layer["recall"], layer["mass_lost"]
        # a longer memory marks a superset of keys among those old enough for it
        assert all(0.0 <= r <= 1.0 for r in recall) and all(0.0 <= m <= 1.0 for m in lost)
    assert (tmp_path / "query_similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corm_against_h2o_matches_a_naive_simulation():
    """query_similarity's offline CORM / H2O eviction against a step-by-step loop from their rules."""
    from query_similarity import corm_against_h2o, full_attention

    torch.manual_seed(1)
    t, d, window, recent = 40, 8, 5, 3
    probs, important = full_attention(torch.randn(4, t, d) * 2, torch.randn(2, t, d) * 2, 0.5)
    rows = torch.tensor([25, 33, 39])
    got = corm_against_h2o(probs, important, window, recent, rows)
    corm_lost, h2o_lost, kept_share = [], [], []
    for kv in range(2):
        gone: set[int] = set()
        evicted_at = {}
        for step in range(t):  # after query ``step`` attends, the rule runs at 1-indexed t = step + 1
            evicted_at[step] = set(gone)
            if step + 1 >= window:
                for i in range(step - recent + 1):
                    if not any(important[kv, u, i] for u in range(step - window + 1, step + 1)):
                        gone.add(i)
        for row in rows.tolist():
            evicted = evicted_at[row]
            keep = row + 1 - len(evicted)
            score = {i: float(probs[kv, :, :row, i].sum()) for i in range(row - recent + 1)}
            kept_old = sorted(score, key=lambda i: -score[i])[: keep - (recent if row >= recent else row + 1)]
            h2o_evicted = [i for i in score if i not in kept_old]
            for head in range(2):
                corm_lost.append(sum(float(probs[kv, head, row, i]) for i in evicted))
                h2o_lost.append(sum(float(probs[kv, head, row, i]) for i in h2o_evicted))
            kept_share.append(keep / (row + 1))
    assert got["corm_lost"] == pytest.approx(sum(corm_lost) / len(corm_lost))
    assert got["h2o_lost"] == pytest.approx(sum(h2o_lost) / len(h2o_lost))
    assert got["corm_kept"] == pytest.approx(sum(kept_share) / len(kept_share))
    assert 0 < got["corm_kept"] < 1  # the rule evicted something: the comparison is not vacuous


def test_agreement_matches_a_naive_count():
    """The vectorised recall / mass-lost of query_similarity against loops written from its definition."""
    from query_similarity import agreement, full_attention

    torch.manual_seed(0)
    t, d, g, windows, first = 24, 8, 2, (1, 3, 8), 10
    q, k = torch.randn(2 * g, t, d) * 2, torch.randn(2, t, d) * 2
    got = agreement(*full_attention(q, k, 0.5), windows, first)
    probs = torch.zeros(2 * g, t, t, dtype=torch.float64)
    for h in range(2 * g):
        for i in range(t):
            probs[h, i, : i + 1] = torch.softmax((q[h, i, None].double() @ k[h // g, : i + 1].double().T)[0] * 0.5, -1)
    important = [[[any(probs[kv * g + j, i, s] >= 1 / (i + 1) for j in range(g)) for s in range(t)] for i in range(t)]
                 for kv in range(2)]
    for n, w in enumerate(windows):
        hit = total = 0
        lost = []
        for kv in range(2):
            for i in range(first, t):
                old = [s for s in range(t) if s <= i - w]
                unmarked = [s for s in old if not any(important[kv][u][s] for u in range(max(i - w, 0), i))]
                mine = [s for s in old if important[kv][i][s]]
                total += len(mine)
                hit += len([s for s in mine if s not in unmarked])
                for j in range(g):
                    lost.append(float(sum(probs[kv * g + j, i, s] for s in unmarked)))
        assert got["recall"][n] == pytest.approx(hit / total)
        assert got["mass_lost"][n] == pytest.approx(sum(lost) / len(lost))
    for n, alpha in enumerate((1.0, 0.25, 0.1)):
        below = [float(sum(p for p in probs[h, i, : i + 1] if p < alpha / (i + 1))) for h in range(2 * g)
                 for i in range(first, t)]
        assert got["mass_below_alpha"][n] == pytest.approx(sum(below) / len(below))
    shares = [sum(important[kv][i][: i + 1]) / (i + 1) for kv in range(2) for i in range(first, t)]
    assert got["important_share"][0] == pytest.approx(sum(shares) / len(shares))


def test_gqa_experiment_mha_copy_is_the_same_model(tmp_path):
    """(a) and (d) of scripts/gqa_experiment.py run on an MHA rewrite of the GQA model: same
    logits, four times the KV heads."""
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
    done = run_script("evaluate", "--quick", "--model", tmp_path / "absent", "--out", tmp_path, timeout=120)
    assert done.returncode == 1 and "no such folder" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("setting, message", [("window=0", "CacheConfig.window must be >= 1"),
                                              ("window=x1", "'window=x1' in 'window=x1' is not name=number")])
def test_bad_corm_setting_is_one_line_before_anything_runs(tmp_path, setting, message):
    done = run_script("evaluate", "--model", "weights", "--corm", setting, "--out", tmp_path, timeout=120)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "results.json").exists()
