"""The real SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader (fp32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cormlm

CHAT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
TEXT = "def fibonacci(n):\n    # 12345 apples, naïve café ☕ — <|im_start|>user\nHello!<|im_end|>"


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return cormlm.load_model(smollm2_gguf, dtype=torch.float32), cormlm.load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def theirs(smollm2_gguf):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32)
    return model.eval()


def test_config_from_metadata(ours):
    config = ours[0].config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (576, 1536, 49152)
    assert config.rope.theta == 100000.0 and config.context_length == 8192 and config.tie_word_embeddings
    assert config.norm_eps == 1e-5


@pytest.mark.parametrize("kernel, tolerance", [("linear", 1e-4), (None, 5e-4)], ids=["f-linear", "measured"])
def test_logits_equal_transformers_gguf_loader(ours, theirs, kernel, tolerance, monkeypatch):
    """Through F.linear (transformers' kernel) to 1e-4; through the kernels this machine measured
    fastest (oneDNN's products add up in another order) to 5e-4 over 30 layers."""
    if kernel is None:
        monkeypatch.delenv("CORMLM_LINEAR_KERNEL", raising=False)
    else:
        monkeypatch.setenv("CORMLM_LINEAR_KERNEL", kernel)
    model, tokenizer = ours
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        expected = theirs(ids).logits
        for _ in range(2 if kernel is None else 1):  # measured: while trials run, then with the choices made
            got = model(ids)
            assert (got - expected).abs().max().item() <= tolerance


def test_greedy_chat_answer_equals_transformers(ours, theirs):
    from cormlm.chat import render_chat

    model, tokenizer = ours
    prompt = tokenizer.encode(render_chat(tokenizer, CHAT), add_special_tokens=False)
    out = cormlm.generate(model, [prompt], max_new_tokens=32, cache=cormlm.CacheConfig("full"))
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    assert len(out.new_tokens[0]) == 32  # a long answer: no stop token within the 32 compared
    assert out.new_tokens[0] == expected[0, len(prompt):].tolist()
    answer = tokenizer.decode(out.new_tokens[0])
    assert "light" in answer, answer


def test_cli_chats_with_the_gguf_file_and_inspects_it(smollm2_gguf, ours):
    cormlm_cli = str(Path(sys.executable).parent / "cormlm")
    done = subprocess.run([cormlm_cli, "generate", "--chat", "--model", str(smollm2_gguf), "--policy", "full",
                           "What is the capital of France?"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "The capital of France is Paris."
    assert "+ 8 new tokens" in done.stderr  # 7 words and <|im_end|>, where it stopped
    inspect = subprocess.run([cormlm_cli, "inspect", "--json", str(smollm2_gguf)], capture_output=True, text=True,
                             timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    info = json.loads(inspect.stdout)
    assert info["parameters"] == sum(p.numel() for p in ours[0].parameters())
    assert (info["layers"], info["heads"], info["kv_heads"], info["dtype"].split(" ")[0]) == (30, 9, 3, "Q4_1,")
