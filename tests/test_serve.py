"""``cormlm serve`` in a subprocess on 127.0.0.1, spoken to with the official ``openai`` client:
completions, chat, streaming, stop strings, 16 concurrent requests each equal to its solo
``generate`` answer, a client disconnect freeing its row, preemption under a tiny
``--kv-memory`` with every answer complete, and every bad-request path.

Two servers for the whole module (each started once): CORM with a small window on a tiny
random model (so eviction happens), and a full cache in a few KiB (so preemption happens).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from bench_serve import ServerProcess

import cormlm
from cormlm.chat import render_chat
from cormlm.checkpoint.embedded import embedded_model_path
from cormlm.checkpoint.random_weights import write_random_llama
from cormlm.cli.common import byte_size

MODEL = "tiny"
CORM = ["--policy", "corm", "--window", "8", "--recent", "4", "--block-size", "4"]
FULL = ["--policy", "full", "--block-size", "4"]
CONFIGS = {"corm": cormlm.CacheConfig("corm", window=8, recent=4, block_size=4),  # the same as the flags
           "full": cormlm.CacheConfig("full", block_size=4)}
TINY_KV = 60_000  # bytes: any one request fits, two long answers do not
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny random Llama (peaked attention) with the embedded model's tokenizer and a chat template."""
    folder = write_random_llama(tmp_path_factory.mktemp("serve"), hidden=64, layers=2, heads=4, kv_heads=2,
                                intermediate=128, vocab=8192, max_positions=4096, qk_scale=4.0)
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(embedded_model_path() / name, folder / name)
    config = json.loads((embedded_model_path() / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return folder


def _server(folder: Path, tmp_path_factory, name: str, flags: list[str]):
    log = tmp_path_factory.mktemp(name) / "serve.log"
    with ServerProcess(["--model", str(folder), "--model-name", MODEL, *flags], log, ready_timeout=120) as server:
        yield server


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    yield from _server(folder, tmp_path_factory, "corm", [*CORM, "--max-batch", "6"])


@pytest.fixture(scope="module")
def small_server(folder, tmp_path_factory):
    yield from _server(folder, tmp_path_factory, "tiny-kv", [*FULL, "--kv-memory", str(TINY_KV), "--max-queue", "6"])


@pytest.fixture(scope="module")
def packed_server(folder, tmp_path_factory):
    from cormlm.models.linear import _onednn_available

    if not _onednn_available():
        pytest.skip("this torch build has no oneDNN")
    yield from _server(folder, tmp_path_factory, "packed", [*CORM, "--pack-weights", "--max-batch", "6"])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(folder):
    """Solo ``cormlm.generate`` answers, as ``cormlm generate`` gives them."""
    model, tokenizer = cormlm.load_model(folder), cormlm.load_tokenizer(folder)

    def answer(ids: list[int], max_tokens: int, policy: str = "corm") -> tuple[str, int]:
        out = cormlm.generate(model, [ids], max_new_tokens=max_tokens, cache=CONFIGS[policy],
                              eos_token_id=tokenizer.eos_token_ids or None)
        return tokenizer.decode(out.new_tokens[0]), len(out.new_tokens[0])

    answer.tokenizer = tokenizer
    return answer


PROMPTS = [f"def handler_{i}(request):\n" + "    value = compute(value)\n" * (i % 5) for i in range(16)]


def test_completion_equals_generate_with_usage(client, reference):
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0)
    ids = reference.tokenizer.encode(PROMPTS[3])
    text, new = reference(ids, 12)
    assert answer.choices[0].text == text and answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), new)
    assert answer.usage.total_tokens == len(ids) + new and answer.object == "text_completion"
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text


def test_chat_uses_the_template_and_streams_the_same_answer(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    ids = reference.tokenizer.encode(render_chat(reference.tokenizer, messages), add_special_tokens=False)
    text, _ = reference(ids, 10)
    assert answer.choices[0].message.content == text and answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(ids) and answer.object == "chat.completion"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices


def test_streamed_completion_equals_the_whole_answer(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=16, temperature=0,
                                            stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_and_trim_the_answer(client):
    free = client.completions.create(model=MODEL, prompt=PROMPTS[7], max_tokens=24, temperature=0).choices[0].text
    stop = free[6:9]
    expected = free[: free.find(stop)]
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[7], max_tokens=24, temperature=0,
                                       stop=[stop, "never appears"])
    assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPTS[7], max_tokens=24, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_sixteen_concurrent_requests_each_equal_their_solo_answer(client, reference, server):
    cases = [(prompt, 4 + (3 * i) % 13) for i, prompt in enumerate(PROMPTS)]

    def ask(case):
        prompt, max_tokens = case
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, cases))
    for (prompt, max_tokens), answer in zip(cases, answers):
        text, new = reference(reference.tokenizer.encode(prompt), max_tokens)
        assert answer.choices[0].text == text and answer.usage.completion_tokens == new
    metrics = server.metrics()
    assert metrics["cormlm_requests_running_peak"] > 1  # they really ran together
    assert metrics["cormlm_kv_retained_fraction"] <= 1.0


def test_a_server_with_packed_weights_answers_as_the_plain_model(packed_server, reference):
    """``--pack-weights``: requests batched through oneDNN-packed weights get the plain model's answers."""
    packed_client = openai.OpenAI(base_url=packed_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    cases = [(prompt, 6 + i % 5) for i, prompt in enumerate(PROMPTS[:6])]

    def ask(case):
        prompt, max_tokens = case
        return packed_client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(ask, cases))
    for (prompt, max_tokens), answer in zip(cases, answers):
        text, new = reference(reference.tokenizer.encode(prompt), max_tokens)
        assert answer.choices[0].text == text and answer.usage.completion_tokens == new
    assert packed_server.metrics()["cormlm_requests_running_peak"] > 1


def _wait_for(server, condition, seconds: float = 20.0) -> dict[str, float]:
    """/metrics once ``condition`` holds (they are updated after each scheduler step)."""
    deadline = time.monotonic() + seconds
    while not condition(metrics := server.metrics()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition(metrics), metrics
    return metrics


def test_a_client_disconnect_frees_its_row(client, server):
    before = server.metrics().get('cormlm_requests_finished_total{reason="cancelled"}', 0)
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3900, temperature=0, stream=True)
    next(iter(stream))
    assert _wait_for(server, lambda m: m["cormlm_requests_running"] == 1)["cormlm_kv_bytes_in_use"] > 0
    stream.close()
    metrics = _wait_for(server, lambda m: m["cormlm_requests_running"] == 0)
    assert metrics["cormlm_kv_bytes_in_use"] == 0
    assert metrics['cormlm_requests_finished_total{reason="cancelled"}'] == before + 1
    # A client waiting for the whole (non-streamed) answer hangs up while its row is running.
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 3900, "temperature": 0}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %b\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%b" % (host.encode(), len(body), body))
        _wait_for(server, lambda m: m["cormlm_requests_running"] == 1)
    metrics = _wait_for(server, lambda m: m['cormlm_requests_finished_total{reason="cancelled"}'] == before + 2)
    assert metrics["cormlm_requests_running"] == 0 and metrics["cormlm_kv_bytes_in_use"] == 0


def test_preemption_under_a_tiny_kv_memory_keeps_every_answer(small_server, reference):
    client = openai.OpenAI(base_url=small_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    prompts = PROMPTS[10:15]

    def ask(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, answer in zip(prompts, answers):
        text, new = reference(reference.tokenizer.encode(prompt), 40, "full")
        assert answer.choices[0].text == text and answer.usage.completion_tokens == new
    metrics = small_server.metrics()
    assert metrics["cormlm_requests_preempted_total"] > 0
    assert metrics["cormlm_kv_bytes_budget"] == TINY_KV


def _error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert code is None or error["code"] == code
    assert param is None or error["param"] == param
    return error["message"]


@pytest.mark.parametrize("body,code,param", [
    ({"model": "gpt-4", "prompt": "x"}, "model_not_found", "model"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, "invalid_value", "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "invalid_value", "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": 3}, "invalid_value", "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "invalid_value", "top_p"),
    ({"model": MODEL, "prompt": "x", "stop": 5}, "invalid_value", None),
    ({"model": MODEL, "prompt": "x", "n": 2}, "invalid_value", None),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, "invalid_value", "stream"),
    ({"model": MODEL, "prompt": 17}, "invalid_value", None),
    ({"model": MODEL, "prompt": [1, 99999]}, "invalid_value", "prompt"),
    ({"model": MODEL}, "invalid_value", "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 5000}, "context_length_exceeded", "prompt"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": 0.5}, "invalid_value", "frequency_penalty"),
    ({"model": MODEL, "prompt": "x", "echo": True}, "invalid_value", "echo"),
])
def test_bad_completion_requests_get_400_in_the_api_shape(server, body, code, param):
    _error(httpx.post(server.url + "/v1/completions", json=body, timeout=30), 400, code, param)


def test_more_bad_requests(server, small_server):
    url = server.url
    assert "not valid JSON" in _error(httpx.post(url + "/v1/completions", content=b"{oops", timeout=30), 400,
                                      "invalid_json")
    _error(httpx.post(url + "/v1/completions", content=b"[1, 2]", timeout=30), 400, "invalid_json")
    long_prompt = [5] * 4095
    _error(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": long_prompt}, timeout=30), 400,
           "context_length_exceeded")
    _error(httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": "hi"}, timeout=30), 400,
           "invalid_value", "messages")
    _error(httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot",
                                                                                        "content": "x"}]},
                      timeout=30), 400, "invalid_value")
    _error(httpx.get(url + "/v1/nothing", timeout=30), 404)
    over_budget = {"model": MODEL, "prompt": [5] * 200, "max_tokens": 1}
    assert "--kv-memory" in _error(httpx.post(small_server.url + "/v1/completions", json=over_budget, timeout=30),
                                   400, "kv_memory_exceeded")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="other", prompt="x")
    assert caught.value.status_code == 400 and caught.value.code == "model_not_found"


def test_a_full_queue_answers_429(small_server):
    """Six waiting at most: the rest of a burst is refused with 429, and those accepted still finish."""
    body = {"model": MODEL, "prompt": [7] * 60, "max_tokens": 30, "temperature": 0}

    def post(_):
        return httpx.post(small_server.url + "/v1/completions", json=body, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(16)))
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and set(statuses) <= {200, 429}
    for response in responses:
        if response.status_code == 429:
            _error(response, 429, "rate_limit_exceeded")
        else:
            assert response.json()["choices"][0]["finish_reason"] == "length"


def test_models_health_and_metrics(server):
    models = httpx.get(server.url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}
    response = httpx.get(server.url + "/metrics", timeout=30)
    assert response.headers["content-type"].startswith("text/plain")
    for series in ("cormlm_requests_running", "cormlm_requests_waiting", "cormlm_generation_tokens_per_second",
                   "cormlm_kv_bytes_in_use", "cormlm_kv_bytes_free", "cormlm_kv_retained_fraction"):
        assert f"# TYPE {series} " in response.text


def test_missing_serve_extra_is_one_clear_line():
    code = "import sys; sys.modules['fastapi'] = None; from cormlm.cli import main; sys.exit(main(['serve']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "pip install 'cormlm[serve]'" in done.stderr and "Traceback" not in done.stderr


def test_bad_kv_memory_is_a_usage_error():
    done = subprocess.run([str(Path(sys.executable).parent / "cormlm"), "serve", "--kv-memory", "lots"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--kv-memory" in done.stderr and "512MiB" in done.stderr


@pytest.mark.parametrize("text,size", [("1048576", 2**20), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30),
                                       ("1.5GB", 1_500_000_000), ("64 kib", 65536)])
def test_kv_memory_sizes(text, size):
    assert byte_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2XB", "-5MiB", "0", ""])
def test_bad_kv_memory_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError, match="memory"):
        byte_size(text)


def test_seeded_sampling_is_reproducible(client):
    def ask(seed):
        return client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text

    assert ask(3) == ask(3)  # sampling goes through a torch generator seeded per request
