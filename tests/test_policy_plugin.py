"""A policy added from one file (tests/toy_policy.py) runs through generate() and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cache_cases import kept_positions
from checkpoints import save_hf_model

import cormlm

TESTS = Path(__file__).resolve().parent
CORMLM = str(Path(sys.executable).parent / "cormlm")


def test_toy_policy_runs_through_generate(tmp_path):
    import toy_policy  # noqa: F401  (defining the class registers it)

    assert "keep-even" in cormlm.available_policies()
    model = cormlm.load_model(save_hf_model(tmp_path, "llama", num_key_value_heads=2))
    prompt = torch.randint(0, 160, (1, 30), generator=torch.Generator().manual_seed(0))
    out = cormlm.generate(model, prompt, max_new_tokens=6, cache=cormlm.CacheConfig("keep-even", recent=3),
                          eos_token_id=[])
    seen = 30 + 6 - 1
    want = [p for p in range(seen) if p % 2 == 0 or p >= seen - 3]
    assert kept_positions(out.cache, 2) == [[want] * 2] * 2
    with pytest.raises(cormlm.CacheConfigError, match="policy 'keep-even' does not use CacheConfig.window"):
        cormlm.CacheConfig("keep-even", window=8)


def test_toy_policy_runs_through_the_command_line(tmp_path):
    """Installed the standard way, through a ``cormlm.policies`` entry point (here a bare
    dist-info folder on PYTHONPATH, as pip would write it)."""
    info = tmp_path / "toy_policy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-policy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cormlm.policies]\nkeep-even = toy_policy\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS)])}
    done = subprocess.run([CORMLM, "generate", "--policy", "keep-even", "--recent", "3", "--json", "--quiet",
                           "--max-new-tokens", "4", "def parse(text):\n" * 8], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    cache = json.loads(done.stdout)["cache"]
    assert cache["policy"] == "keep-even" and 0.4 < cache["retained_fraction"] < 0.75
    shown = subprocess.run([CORMLM, "generate", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert "keep-even" in shown.stdout
    assert "keep-even: newest positions kept whatever their parity" in " ".join(shown.stdout.split())
    wrong = subprocess.run([CORMLM, "generate", "--policy", "keep-even", "--budget", "8", "x"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert wrong.returncode == 2 and "policy 'keep-even' does not use --budget; it takes --recent" in wrong.stderr


def test_cache_config_errors_name_the_parameter_for_each_front_end():
    with pytest.raises(cormlm.CacheConfigError) as caught:
        cormlm.CacheConfig("streaming", budget=8, recent=4)
    assert caught.value.parameters == ("budget", "recent")
    assert "exactly one of CacheConfig.budget (tokens in all) or CacheConfig.recent" in str(caught.value)
    assert "exactly one of --budget (tokens in all) or --recent" in caught.value.render(lambda n: "--" + n)
    with pytest.raises(cormlm.CacheConfigError) as caught:  # the user's value is shown as given, braces and all
        cormlm.CacheConfig("corm", window={"w": 1})
    assert caught.value.parameters == ("window",) and "{'w': 1}" in str(caught.value)


def test_a_policy_name_cannot_be_taken_twice():
    from cormlm.cache import corm  # noqa: F401  (registers 'corm' even when this test runs alone)
    from cormlm.cache.policy import EvictionPolicy

    with pytest.raises(cormlm.CacheConfigError, match="policy name 'corm' of .* is taken by cormlm.cache.corm.CormPolicy"):
        type("ImpostorPolicy", (EvictionPolicy,), {"name": "corm"})


def test_a_group_reduction_the_cache_cannot_apply_is_refused_where_the_policy_is_defined():
    """Decode attention hands a policy its query group reduced by ``group_reduce``: a value it
    does not know must not fall back to something else silently."""
    from cormlm.cache.policy import EvictionPolicy

    with pytest.raises(cormlm.CacheConfigError, match="group_reduce must be 'max', 'sum' or None, got 'mean'"):
        type("MeanPolicy", (EvictionPolicy,), {"name": "mean-policy", "group_reduce": "mean"})
    assert "mean-policy" not in cormlm.available_policies()


def test_a_broken_plugin_is_one_clear_line(tmp_path):
    info = tmp_path / "broken_policy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-policy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cormlm.policies]\nbroken = no_such_module_anywhere\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([CORMLM, "generate", "--policy", "corm", "x"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr
    assert "entry point 'broken' (no_such_module_anywhere) failed to load" in done.stderr
