"""The continuous-batching engine behind ``cormlm serve``; no web code, so tests drive it directly.

One scheduler step: drop cancelled requests; admit waiting ones, oldest first, while their
prompt's KV fits the memory budget (admission reserves it); prefill the oldest admitted
request alone in a 1-row cache (a chunk of it when the CacheConfig sets ``prefill_chunk``);
move a finished prefill's row into the running batch; run one decode step for every
running row together. Rows
leave at any step (stop token, stop string, max_tokens, cancellation) and their blocks go
back to the pools; the other rows stay where they are.

Why prefill alone, then move the row: the prefill is then exactly ``cormlm.generate``'s,
and joining costs a copy of the new row's blocks only. Why a preempted request restarts
from its prompt (with its seed): it then recomputes exactly the tokens it had, so what was
already streamed stays valid and its answer is still the one it gets alone.

Memory is counted in the cache's blocks that rows own (``RaggedCache.bytes_in_use``),
measured, so whatever CORM evicts is free for the next request.
"""

from __future__ import annotations

import itertools
import random
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..cache import CacheConfig, make_cache
from ..cache.ragged import RaggedCache
from ..errors import CormlmError, InputError
from ..sampling import SamplingConfig, next_tokens
from .textstream import TextStream

RATE_WINDOW = 10.0  # seconds over which tokens/s is measured


class ContextLengthError(InputError):
    code = "context_length_exceeded"


class KVMemoryError(InputError):
    code = "kv_memory_exceeded"


class QueueFullError(CormlmError):
    """The waiting queue is at ``max_queue``: the client should retry later (HTTP 429)."""


@dataclass
class Event:
    """What a request's listener hears: new text, then a last event with ``finish_reason``
    ("stop" or "length") or ``error``."""

    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    on_event: Callable[[Event], None]  # called from the engine's thread
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    id: str = ""


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    prefilling: int = 0
    peak_running: int = 0
    kv_budget: int = 0
    kv_bytes_in_use: int = 0  # blocks owned by rows (what the budget counts)
    kv_bytes_held: int = 0  # every tensor the caches hold, spare pool capacity included
    retained_fraction: float = 1.0  # of the running rows' keys
    tokens_per_second: float = 0.0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    finished_total: dict[str, int] = field(default_factory=dict)  # by finish reason, "error" included
    preempted_total: int = 0
    rejected_total: int = 0  # queue full


class _Job:
    """A request and its progress; reset to the prompt when preempted."""

    def __init__(self, request: Request, seed: int, tokenizer, device: torch.device) -> None:
        self.request = request
        self.seed = seed
        self.sampling = SamplingConfig(request.temperature, None, request.top_p)
        self.tokenizer, self.device = tokenizer, device
        self.sent = 0  # characters already given to the listener, over every attempt
        self.order = 0  # admission order: the newest is preempted first
        self.restart()

    def restart(self) -> None:
        self.generated: list[int] = []
        self.text = TextStream(self.tokenizer, self.request.stop)
        self.generator = None if self.sampling.greedy else torch.Generator(device=self.device).manual_seed(self.seed)
        self.cache: RaggedCache | None = None  # its own, while it prefills
        self.prefilled = 0
        self.pending = -1  # the last sampled token, fed at the next decode step

    def sample(self, logits: torch.Tensor) -> int:
        """One token from [1, V] logits, as ``cormlm.generate`` samples a row."""
        return int(next_tokens(logits.float(), self.sampling, self.generator)[0])


class Engine:
    def __init__(self, model, tokenizer, cache_config: CacheConfig, kv_memory: int, *, max_batch: int = 32,
                 max_queue: int = 128, stop_ids: Sequence[int] | None = None) -> None:
        self.model, self.tokenizer, self.cache_config = model, tokenizer, cache_config
        self.kv_budget, self.max_batch, self.max_queue = kv_memory, max_batch, max_queue
        self.stop_ids = set(stop_ids if stop_ids is not None else model.config.eos_token_ids)
        probe = make_cache(model, cache_config, batch_size=1)
        self._block_bytes = probe.pools[0].block_nbytes()
        self._block_slots = probe.block_size
        self._streams_per_row = probe.num_layers * probe.num_kv_heads
        self._lock = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._cancelled: set[str] = set()
        self._prefilling: list[_Job] = []
        self._running: list[_Job] = []  # row i of self._cache
        self._cache: RaggedCache | None = None
        self._order = itertools.count()
        self._ids = itertools.count()
        self._rate: deque[tuple[float, int]] = deque()
        self._stats = EngineStats(kv_budget=kv_memory)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ----------------------------------------------------------------- web side
    def submit(self, request: Request) -> None:
        """Queue a request, or raise: InputError subclasses for a request that can never run
        (HTTP 400), QueueFullError when the queue is full (HTTP 429)."""
        prompt, limit = request.prompt_ids, self.model.config.context_length
        if not prompt:
            raise InputError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise InputError(f"prompt token ids must be in 0..{vocab - 1}")
        if len(prompt) + request.max_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt) + request.max_tokens} tokens ({len(prompt)} in the prompt, {request.max_tokens} for "
                "the completion). Please reduce the prompt or max_tokens.")
        need = self.prompt_bytes(len(prompt))
        if need > self.kv_budget:
            raise KVMemoryError(f"the prompt's KV cache ({len(prompt)} tokens, {need:,} bytes) exceeds the server's "
                                f"whole KV memory budget ({self.kv_budget:,} bytes); shorten the prompt or start "
                                "the server with a larger --kv-memory")
        if not request.id:
            request.id = f"req-{next(self._ids)}"
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        job = _Job(request, seed, self.tokenizer, self.model.device)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                self._stats.rejected_total += 1
                raise QueueFullError(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(job)
            self._stats.prompt_tokens_total += len(prompt)
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        """Stop a request (its client went away); its row is freed at the next step."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(**{**vars(self._stats), "finished_total": dict(self._stats.finished_total)})

    def prompt_bytes(self, tokens: int) -> int:
        """KV bytes a prompt's prefill may hold, in whole blocks, plus one block per stream
        for its first decoded tokens."""
        blocks = -(-tokens // self._block_slots) + 1
        return blocks * self._streams_per_row * self._block_bytes

    # ------------------------------------------------------------- engine thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cormlm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail_all("the server is shutting down", "server_shutdown")

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                busy = self.step()
            except Exception as exc:  # never leave a request hanging: fail them all, say why, go on
                traceback.print_exc(file=sys.stderr)
                self._fail_all(f"internal error in the engine: {type(exc).__name__}: {exc}", "internal_error")
                busy = False
            if not busy:
                with self._lock:
                    if not (self._waiting or self._cancelled or self._stopping):
                        self._lock.wait(timeout=1.0)

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler iteration; returns whether any request is still in the engine."""
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            for job in [job for job in self._waiting if job.request.id in cancelled]:
                self._waiting.remove(job)
                self._count("cancelled")
        self._drop_cancelled(cancelled)
        self._admit()
        self._prefill_step()
        self._decode_step()
        self._measure()
        with self._lock:
            return bool(self._running or self._prefilling or self._waiting)

    # -------------------------------------------------------------------- steps
    def _drop_cancelled(self, cancelled: set[str]) -> None:
        for job in [job for job in self._prefilling if job.request.id in cancelled]:
            self._prefilling.remove(job)
            self._count("cancelled")
        rows = [i for i, job in enumerate(self._running) if job.request.id in cancelled]
        if rows:
            self._remove_rows(rows)
            for _ in rows:
                self._count("cancelled")

    def _bytes_in_use(self) -> int:
        """The running rows' blocks, and for each admitted prefill what its prompt may take
        (reserved at admission, so that one step never admits more than fits)."""
        running = self._cache.bytes_in_use() if self._cache is not None else 0
        return running + sum(max(job.cache.bytes_in_use(), self.prompt_bytes(len(job.request.prompt_ids)))
                             for job in self._prefilling)

    def _admit(self) -> None:
        released = False
        while len(self._running) + len(self._prefilling) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting[0]
            headroom = len(self._running) * self._streams_per_row * self._block_bytes  # a block per running stream
            need = self.prompt_bytes(len(job.request.prompt_ids)) + headroom
            if (self._running or self._prefilling) and self._bytes_in_use() + need > self.kv_budget:
                if released or self._cache is None:
                    return
                self._cache.release_empty_blocks()  # what CORM emptied since the last check counts now
                released = True
                continue
            with self._lock:
                self._waiting.popleft()
            job.order = next(self._order)
            job.cache = make_cache(self.model, self.cache_config, batch_size=1)
            self._prefilling.append(job)

    def _prefill_step(self) -> None:
        """A chunk (or the whole prompt) of the oldest admitted request, in its own cache, as
        ``cormlm.generate`` prefills it; a finished prefill samples its first token and joins.
        One per step, so the running requests decode between prefills."""
        for job in self._prefilling[:1]:
            prompt = job.request.prompt_ids
            chunk = job.cache.prefill_chunk or len(prompt)
            ids = torch.tensor([prompt[job.prefilled:job.prefilled + chunk]], device=self.model.device)
            logits = self.model.forward_unchecked(ids, None, job.cache, last_logits_only=True)
            job.prefilled += ids.shape[1]
            if job.prefilled < len(prompt):
                continue
            self._prefilling.remove(job)
            cache, job.cache = job.cache, None
            if self._accept(job, job.sample(logits[:, -1])):
                if self._cache is None:
                    self._cache = cache
                else:
                    self._cache.append_rows(cache)
                self._running.append(job)

    def _decode_step(self) -> None:
        self._make_room()
        if not self._running:
            return
        tokens = torch.tensor([job.pending for job in self._running], device=self.model.device)
        logits = self.model.forward_unchecked(tokens[:, None], None, self._cache, last_logits_only=True)[:, -1]
        greedy = logits.float().argmax(dim=-1).tolist()
        done = [i for i, job in enumerate(self._running)
                if not self._accept(job, greedy[i] if job.sampling.greedy else job.sample(logits[i:i + 1]))]
        if done:
            self._remove_rows(done)
        self._rate.append((time.perf_counter(), len(self._running) + len(done)))

    def _make_room(self) -> None:
        """Before a decode step: while the blocks it takes would overrun the budget, preempt
        the newest request (it goes back to the front of the queue, to be recomputed)."""
        released = False
        while self._running:
            if self._bytes_in_use() + self._cache.bytes_for_next_token() <= self.kv_budget:
                return
            if not released:
                self._cache.release_empty_blocks()
                released = True
                continue
            jobs = self._running + self._prefilling
            victim = max(jobs, key=lambda job: job.order)
            if len(jobs) == 1:
                self._remove_rows([0])
                self._finish(victim, Event(error=(
                    f"the server's KV memory budget ({self.kv_budget:,} bytes) ran out for this request alone after "
                    f"{len(victim.generated)} tokens; lower max_tokens or start the server with a larger "
                    "--kv-memory"), error_code=KVMemoryError.code))
                return
            if victim in self._prefilling:
                self._prefilling.remove(victim)
            else:
                self._remove_rows([self._running.index(victim)])
            victim.restart()
            with self._lock:
                self._waiting.appendleft(victim)
                self._stats.preempted_total += 1

    def _remove_rows(self, rows: list[int]) -> None:
        self._cache.remove_rows(rows)
        gone = set(rows)
        self._running = [job for i, job in enumerate(self._running) if i not in gone]
        if not self._running:
            self._cache = None  # all its memory goes back

    # ----------------------------------------------------------------- requests
    def _accept(self, job: _Job, token: int) -> bool:
        """Take a job's new token; tell its listener what became final; False when it ended."""
        job.generated.append(token)
        job.pending = token
        with self._lock:
            self._stats.generated_tokens_total += 1
        final = job.text.push(token)
        reason = ("stop" if token in self.stop_ids or job.text.stopped else
                  "length" if len(job.generated) >= job.request.max_tokens else None)
        if reason is not None:
            final = job.text.text  # all of it now: nothing more can complete a character or a stop string
        delta = final[job.sent:]
        job.sent = max(job.sent, len(final))
        if reason is not None:
            self._finish(job, Event(text=delta, finish_reason=reason))
            return False
        if delta:
            job.request.on_event(Event(text=delta))
        return True

    def _finish(self, job: _Job, event: Event) -> None:
        event.prompt_tokens = len(job.request.prompt_ids)
        event.completion_tokens = len(job.generated)
        self._count(event.finish_reason or "error")
        job.request.on_event(event)

    def _count(self, reason: str) -> None:
        with self._lock:
            self._stats.finished_total[reason] = self._stats.finished_total.get(reason, 0) + 1

    def _fail_all(self, message: str, code: str) -> None:
        with self._lock:
            jobs = list(self._waiting) + self._prefilling + self._running
            self._waiting.clear()
        self._prefilling, self._running, self._cache = [], [], None
        for job in jobs:
            self._finish(job, Event(error=message, error_code=code))

    def _measure(self) -> None:
        now = time.perf_counter()
        while self._rate and self._rate[0][0] < now - RATE_WINDOW:
            self._rate.popleft()
        caches = ([self._cache] if self._cache is not None else []) + [job.cache for job in self._prefilling]
        held = sum(sum(t.untyped_storage().nbytes() for t in c.storage_tensors()) for c in caches)
        in_use = sum(c.bytes_in_use() for c in caches)
        retained = self._cache.retained_fraction() if self._cache is not None else 1.0
        span = now - self._rate[0][0] if len(self._rate) > 1 else 0.0
        rate = sum(n for _, n in list(self._rate)[1:]) / span if span > 0 else 0.0
        with self._lock:
            s = self._stats
            s.running, s.waiting, s.prefilling = len(self._running), len(self._waiting), len(self._prefilling)
            s.peak_running = max(s.peak_running, len(self._running))
            s.kv_bytes_in_use, s.kv_bytes_held, s.retained_fraction, s.tokens_per_second = in_use, held, retained, rate
