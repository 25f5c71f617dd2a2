"""The continuous-batching engine driven step by step, without a web server: requests that
join and leave a running batch get exactly their solo ``cormlm.generate`` tokens, under
preemption too; cancellation frees the row; bad requests are refused up front."""

from __future__ import annotations

import pytest
import torch
from checkpoints import make_peaky_checkpoint

import cormlm
from cormlm.serve.scheduler import ContextLengthError, Engine, KVMemoryError, QueueFullError, Request
from cormlm.serve.textstream import TextStream

CONFIGS = {"full": cormlm.CacheConfig("full", block_size=4),
           "corm": cormlm.CacheConfig("corm", window=6, recent=3, block_size=4)}


class SpelledTokenizer:
    """Token id n decodes as "<n>": text that maps back to the ids exactly."""

    def decode(self, ids) -> str:
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_peaky_checkpoint(tmp_path_factory.mktemp("engine"), factor=4.0, num_key_value_heads=2,
                                   max_position_embeddings=512)
    return cormlm.load_model(folder)


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 160, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


class Listener:
    def __init__(self) -> None:
        self.events = []

    def __call__(self, event) -> None:
        self.events.append(event)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def done(self):
        return self.events[-1] if self.events and self.events[-1].final else None


def _engine(model, policy: str, kv_memory: int = 1 << 30, **kwargs) -> Engine:
    return Engine(model, SpelledTokenizer(), CONFIGS[policy], kv_memory, stop_ids=[], **kwargs)


def _submit(engine: Engine, prompt: list[int], max_tokens: int, **kwargs) -> Listener:
    listener = Listener()
    engine.submit(Request(prompt, max_tokens, listener, **kwargs))
    return listener


def _solo(model, policy: str, prompt: list[int], max_tokens: int, **kwargs) -> str:
    out = cormlm.generate(model, [prompt], max_new_tokens=max_tokens, cache=CONFIGS[policy], eos_token_id=[], **kwargs)
    return SpelledTokenizer().decode(out.new_tokens[0])


def _run(engine: Engine, listeners: list[Listener], limit: int = 2000) -> None:
    for _ in range(limit):
        if not engine.step():
            break
    assert all(listener.done for listener in listeners)


@pytest.mark.parametrize("policy", ["full", "corm"])
def test_sixteen_requests_joining_and_leaving_equal_their_solo_runs(model, policy):
    engine = _engine(model, policy, max_batch=6)
    cases = [(_prompt(5 + 7 * i, i), 3 + (5 * i) % 17) for i in range(16)]
    listeners = [_submit(engine, prompt, steps) for prompt, steps in cases[:10]]
    for _ in range(7):  # the rest arrive while the first ones decode
        engine.step()
    listeners += [_submit(engine, prompt, steps) for prompt, steps in cases[10:]]
    _run(engine, listeners)
    stats = engine.stats()
    assert stats.peak_running == 6 and stats.running == 0 and stats.kv_bytes_in_use == 0
    for (prompt, steps), listener in zip(cases, listeners):
        assert listener.text == _solo(model, policy, prompt, steps)
        assert listener.done.finish_reason == "length" and listener.done.completion_tokens == steps
        assert listener.done.prompt_tokens == len(prompt)


def test_seeded_sampling_equals_solo_sampling(model):
    engine = _engine(model, "full")
    cases = [(_prompt(9, 1), 0.8, None, 5), (_prompt(14, 2), 1.2, 0.9, 6)]
    listeners = [_submit(engine, p, 12, temperature=t, top_p=top_p, seed=seed) for p, t, top_p, seed in cases]
    _run(engine, listeners)
    for (prompt, t, top_p, seed), listener in zip(cases, listeners):
        assert listener.text == _solo(model, "full", prompt, 12, temperature=t, top_p=top_p, seed=seed)


@pytest.mark.parametrize("policy", ["full", "corm"])
def test_preemption_under_a_tiny_budget_keeps_every_answer(model, policy):
    probe = _engine(model, policy)
    budget = probe.prompt_bytes(40) * 2  # two prompts fit; their decoding does not
    engine = _engine(model, policy, kv_memory=budget)
    cases = [(_prompt(30 + i, 20 + i), 40) for i in range(4)]
    listeners = [_submit(engine, prompt, steps) for prompt, steps in cases]
    peak = 0
    for _ in range(3000):
        busy = engine.step()
        peak = max(peak, engine.stats().kv_bytes_in_use)
        if not busy:
            break
    assert peak <= budget
    if policy == "full":
        assert engine.stats().preempted_total > 0
    for (prompt, steps), listener in zip(cases, listeners):
        assert listener.done.finish_reason == "length"
        assert listener.text == _solo(model, policy, prompt, steps)


def test_a_lone_request_over_the_budget_ends_with_a_clear_error(model):
    probe = _engine(model, "full")
    engine = _engine(model, "full", kv_memory=probe.prompt_bytes(20))
    listener = _submit(engine, _prompt(20, 1), 100)
    _run(engine, [listener])
    assert listener.done.error_code == "kv_memory_exceeded" and "--kv-memory" in listener.done.error


def test_cancel_frees_the_row(model):
    engine = _engine(model, "corm")
    a, b = _submit(engine, _prompt(20, 1), 50), _submit(engine, _prompt(25, 2), 50)
    for _ in range(4):
        engine.step()
    before = engine.stats()
    engine.cancel("req-0")
    engine.step()
    after = engine.stats()
    assert (before.running, after.running) == (2, 1) and after.kv_bytes_in_use < before.kv_bytes_in_use
    assert after.finished_total == {"cancelled": 1}
    _run(engine, [b])
    assert a.done is None and b.done.finish_reason == "length"


def test_requests_that_can_never_run_are_refused(model):
    engine = _engine(model, "full", kv_memory=50_000, max_queue=2)
    with pytest.raises(ContextLengthError, match="maximum context length is 512 tokens"):
        engine.submit(Request(_prompt(500, 1), 20, print))
    with pytest.raises(KVMemoryError, match="larger --kv-memory"):
        engine.submit(Request(_prompt(400, 1), 20, print))
    engine.submit(Request(_prompt(5, 1), 2, print))
    engine.submit(Request(_prompt(5, 1), 2, print))
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(Request(_prompt(5, 1), 2, print))


class CharTokenizer:
    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_what_may_become_a_stop_string():
    stream = TextStream(CharTokenizer(), stop=["END", "xy"])
    shown = [stream.push(ord(c)) for c in "abcENxEND"]
    # "E", "EN" may begin "END", "x" may begin "xy": held back until they cannot
    assert shown == ["a", "ab", "abc", "abc", "abc", "abcEN", "abcENx", "abcENx", "abcENx"]
    assert stream.stopped and stream.text == "abcENx"
    split = TextStream(CharTokenizer())
    assert split.push(ord("a")) == "a" and split.push(0xFFFD) == "a"  # a character still incomplete
