"""The installed ``cormlm`` command, run in a subprocess as a person would run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CORMLM = str(Path(sys.executable).parent / "cormlm")
PROMPT = "def parse(text):\n"


def offline() -> dict[str, str]:
    """The environment for a command: the test's as it stands now (monkeypatch.setenv included)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args: str, stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CORMLM, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=offline())


def generate_json(*args: str) -> dict:
    done = run("generate", "--json", "--quiet", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_default_model_offline_streams_and_summarises():
    done = run("generate", "--max-new-tokens", "12", PROMPT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "cormlm: loaded" in done.stderr and "new tokens" in done.stderr and "of keys kept" in done.stderr


def test_stdin_pipe_dash_and_file_prompts_agree(tmp_path):
    by_arg = run("generate", "--max-new-tokens", "10", "--quiet", PROMPT).stdout
    piped = run("generate", "--max-new-tokens", "10", "--quiet", stdin=PROMPT).stdout
    dash = run("generate", "--max-new-tokens", "10", "--quiet", "-", stdin=PROMPT).stdout
    prompt_file = tmp_path / "prompt.py"
    prompt_file.write_text(PROMPT)
    from_file = run("generate", "--max-new-tokens", "10", "--quiet", "--prompt-file", str(prompt_file)).stdout
    assert by_arg and by_arg == piped == dash == from_file


def test_json_output_and_streaming_text_agree():
    data = generate_json("--max-new-tokens", "10", "--policy", "full", PROMPT)
    streamed = run("generate", "--max-new-tokens", "10", "--policy", "full", "--quiet", PROMPT).stdout
    assert streamed == data["text"] + "\n"
    assert len(data["new_ids"]) <= 10 and data["prompt_ids"][0] == 0  # BOS of the embedded tokenizer
    assert set(data["timings"]) >= {"prefill_tokens_per_second", "decode_tokens_per_second", "load_seconds"}


@pytest.mark.parametrize("flags,limit", [
    (["--policy", "full"], None),
    (["--policy", "corm", "--window", "4", "--recent", "2"], None),
    (["--policy", "streaming", "--budget", "8"], 8),
    (["--policy", "streaming", "--recent", "5", "--sink", "2"], 7),
    (["--policy", "h2o", "--budget", "10"], 10),
    (["--policy", "scissorhands", "--budget", "12", "--window", "8"], 12),
    (["--policy", "knorm", "--budget", "0.5"], "half"),
])
def test_each_policy_cache_stats_are_consistent(flags, limit):
    data = generate_json("--max-new-tokens", "16", *flags, PROMPT * 3)
    cache = data["cache"]
    seen = len(data["prompt_ids"]) + len(data["new_ids"]) - 1  # the last token is never fed back
    assert cache["tokens_seen"] == [seen] and cache["policy"] == flags[1]
    kept = [n for layer in cache["retained_tokens"] for row in layer for n in row]
    assert len(cache["retained_tokens"]) == 6 and len(kept) == 6 * 2  # layers x KV heads
    if limit is None and flags[1] == "full":
        assert kept == [seen] * len(kept) and cache["retained_fraction"] == 1.0
    elif limit is None:
        assert all(n <= seen for n in kept) and min(kept) < seen  # corm w=4 r=2 evicts on this model
    elif limit == "half":
        assert kept == [int(0.5 * seen + 0.5)] * len(kept)
    else:
        assert kept == [limit] * len(kept)
    assert cache["retained_fraction"] == pytest.approx(sum(kept) / (seen * len(kept)))
    assert cache["bytes_full"] == seen * 2 * 6 * 2 * 48 * 4  # fp32 on CPU: K and V, layers, KV heads, dims
    assert cache["compression_ratio"] == pytest.approx(cache["bytes_full"] / cache["bytes_held"])


def test_inspect_text_and_json():
    text = run("inspect")
    assert text.returncode == 0 and "GQA" in text.stdout and "2,304" in text.stdout
    info = json.loads(run("inspect", "--json").stdout)
    assert (info["family"], info["heads"], info["kv_heads"], info["context_length"]) == ("llama", 8, 2, 2048)
    assert info["parameters"] == 12_440_448 and info["kv_bytes_per_token"] == 2 * 6 * 2 * 48 * 2  # bf16


@pytest.mark.parametrize("args,needle", [
    (["generate", "--frobnicate", "x"], "unrecognized arguments: --frobnicate"),
    (["generate", "--policy", "lru", "x"], "invalid choice: 'lru'"),
    (["generate", "--policy", "h2o", "x"], "give --budget"),
    (["generate", "--policy", "streaming", "--budget", "8", "--recent", "4", "x"], "exactly one of --budget"),
    (["generate", "--policy", "h2o", "--budget", "1.5", "x"], "--budget as a fraction must be in (0, 1]"),
    (["generate", "--policy", "corm", "--sink", "2", "x"], "policy 'corm' does not use --sink; it takes --window, --recent, --budget"),
    (["generate", "--policy", "knorm", "--budget", "8", "--window", "4", "x"], "policy 'knorm' does not use --window"),
    (["generate", "--policy", "full", "--sink", "2", "x"], "policy 'full' does not use --sink"),
    (["generate", "--prompt-file", "p.txt", "x"], "not both"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_usage_errors_exit_2_with_one_line(args, needle):
    done = run(*args)
    assert done.returncode == 2
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_failures_exit_1_with_what_to_do(tmp_path):
    missing = run("generate", "--model", str(tmp_path / "absent"), "x")
    assert missing.returncode == 1 and "no such folder" in missing.stderr
    hub = run("generate", "--model", "nobody/no-such-model", "x")
    assert hub.returncode == 1 and "could not be fetched from the Hugging Face hub" in hub.stderr
    too_long = run("generate", "--quiet", "x " * 2100)
    assert too_long.returncode == 1 and "shorten the prompt or lower max_new_tokens" in too_long.stderr
    no_file = run("generate", "--prompt-file", str(tmp_path / "absent.txt"))
    assert no_file.returncode == 1 and "prompt file not found" in no_file.stderr
    for out in (missing, hub, too_long, no_file):
        assert "Traceback" not in out.stderr


def test_chat_needs_a_template():
    done = run("generate", "--chat", "--quiet", "hello")
    assert done.returncode == 1 and "no chat template" in done.stderr


def test_ctrl_c_stops_cleanly_and_keeps_output():
    proc = subprocess.Popen([CORMLM, "generate", "--max-new-tokens", "1900", "--policy", "full", "def f():"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=offline(),
                            # a background job inherits SIGINT ignored; a terminal's process does not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.read(8)  # several tokens streamed (however slow a loaded machine is), then Ctrl-C
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"interrupted" in err and b"Traceback" not in err
    assert len(first) == 8 and len(first + rest) > 1


def test_chat_uses_the_checkpoint_template_and_its_stop_tokens(tmp_path):
    import shutil

    folder = tmp_path / "chat-model"
    shutil.copytree(Path(__file__).resolve().parent.parent / "weights", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                               "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    data = generate_json("--model", str(folder), "--chat", "--max-new-tokens", "6", "hi there")
    import cormlm

    tok = cormlm.load_tokenizer(folder)
    expected = tok.encode("<|begin_of_text|><user>hi there<|end_of_text|><assistant>", add_special_tokens=False)
    assert data["prompt_ids"] == expected and expected.count(tok.bos_token_id) == 1
    assert data["stopped_at_eos"] == (data["new_ids"][-1] in tok.eos_token_ids)


def test_compile_gives_the_eager_tokens_and_a_second_run_loads_the_saved_step(tmp_path, monkeypatch):
    """The first compiled run saves its decode step (cormlm.compile_cache), the second, a new
    process, loads it instead of tracing; both decode what eager decodes."""
    flags = ("--max-new-tokens", "6", "--policy", "corm", "--window", "4", "--recent", "2", PROMPT)
    eager = generate_json(*flags)
    monkeypatch.setenv("CORMLM_COMPILE_CACHE", str(tmp_path))
    for said in ("compiling the decode step ahead of time", "loaded the compiled decode step"):
        done = run("generate", "--json", "--compile", *flags, timeout=300)
        assert done.returncode == 0, done.stderr
        assert said in done.stderr
        compiled = json.loads(done.stdout)
        assert compiled["new_ids"] == eager["new_ids"]
        assert compiled["cache"]["retained_tokens"] == eager["cache"]["retained_tokens"]
    assert len(list(tmp_path.glob("decode-*.pt2"))) == 1 and len(list(tmp_path.glob("kernels-*.json"))) == 1


class _Letters:
    """A tokenizer whose token i is the letter 'a' + i; 99 is half of a character."""

    @staticmethod
    def decode(ids: list[int]) -> str:
        return "".join("\ufffd" if i == 99 else chr(ord("a") + i) for i in ids)


@pytest.mark.parametrize("hold", [0, 1])
def test_the_streamer_holds_the_first_tokens_it_is_told_to_and_loses_none(capsys, hold):
    import torch

    from cormlm.cli.generate import Streamer

    streamer = Streamer(_Letters(), hold=hold)
    written = []
    for token in (0, 1, 99, 2):
        streamer(torch.tensor([token]))
        written.append(capsys.readouterr().out)
    # held: nothing until the second token (a compiled step's status line comes first);
    # a partial character waits for the next token
    assert written == (["a", "b", "", "\ufffdc"] if hold == 0 else ["", "ab", "", "\ufffdc"])
    single = Streamer(_Letters(), hold=1)
    single(torch.tensor([3]))
    assert capsys.readouterr().out == ""
    single.flush()  # generation ended after one token: it is written, not lost
    assert capsys.readouterr().out == "d"
