"""The embedded default model (weights/): size, loading in cormlm and in transformers,
tokenizer agreement, and that it really learned the held-out half of its data."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch

import cormlm

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
SNIPPET = '''import os


def read_lines(path):
    """Return the lines of a text file."""
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\\n") for line in handle]
'''


@pytest.fixture(scope="module")
def model():
    return cormlm.load_model(WEIGHTS)


def test_files_and_size():
    for name in ("config.json", "tokenizer.json", "generation_config.json", "model.safetensors.index.json"):
        assert (WEIGHTS / name).is_file(), name
    total = sum(f.stat().st_size for f in WEIGHTS.glob("*.safetensors"))
    assert total <= 40 * 2**20, f"stored weights are {total / 2**20:.1f} MiB (limit 40)"


def test_architecture(model):
    c = model.config
    assert (c.family, c.num_heads, c.num_kv_heads, c.context_length) == ("llama", 8, 2, 2048)
    assert c.vocab_size == 8192 and c.rope.theta == 500000.0


def test_transformers_loads_it_and_agrees(model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(WEIGHTS, torch_dtype=torch.float32).eval()
    tok = cormlm.load_tokenizer(WEIGHTS)
    ids = torch.tensor([tok.encode(SNIPPET)])
    with torch.inference_mode():
        expected = hf(ids).logits
        got = model(ids)
    assert (got - expected).abs().max().item() <= 1e-4
    with torch.inference_mode():
        hf_tokens = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    ours = cormlm.generate(model, ids, max_new_tokens=24, cache=cormlm.CacheConfig("full"), eos_token_id=[])
    assert ours.new_tokens[0] == hf_tokens


def test_tokenizer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(WEIGHTS)
    tok = cormlm.load_tokenizer(WEIGHTS)
    assert tok.encode(SNIPPET) == hf_tok(SNIPPET)["input_ids"]
    assert tok.encode(SNIPPET)[0] == tok.bos_token_id
    assert tok.decode(tok.encode(SNIPPET), skip_special_tokens=True) == SNIPPET


def _held_out_file() -> Path:
    """A held-out stdlib file (same split rule as scripts/train_tiny.py) of some length."""
    from train_tiny import is_held_out, stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    held = [p for p in stdlib_files(root) if is_held_out(p.relative_to(root).as_posix())]
    held = [p for p in held if 4000 <= p.stat().st_size <= 40000]
    assert held, "no held-out file of a usable size"
    return held[0]


def test_model_predicts_unseen_stdlib_code(model):
    """Cross-entropy on a file it never trained on: far below the uniform log(8192) = 9.0."""
    tok = cormlm.load_tokenizer(WEIGHTS)
    ids = torch.tensor([tok.encode(_held_out_file().read_text(encoding="utf-8"))[:512]])
    with torch.inference_mode():
        logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert loss < 4.5, f"held-out loss {loss:.2f}"
    assert loss < math.log(8192) / 2
