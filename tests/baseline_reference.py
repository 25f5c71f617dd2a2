"""A naive, independent reference of four baseline KV-eviction policies.

Written from the cache contract alone (nothing is shared with ``cormlm``): ``streaming``
(attention sinks + a recent window), ``h2o`` (accumulated attention), ``scissorhands``
(unimportance counted over a window of queries) and ``knorm`` (keeps low-norm keys). The
model is corm_reference's float64 ``ReferenceModel``; the rules run on plain Python lists,
one (layer, KV head) at a time, with dense float64 attention over the keys the head holds.

Notation (as the contract): ``t`` is the 1-indexed position of the latest query; key
positions ``p`` are 0-indexed (the query at ``t`` owns key ``p = t - 1``). After the
attention of every call (the prefill, at ``t = n``, and every decoding step), each
(layer, KV head) evicts:

- ``budget_t`` = ``budget`` (int), or ``max(1, floor(f * t + 0.5))`` for a fraction ``f``.
- streaming: keeps ``p < sink`` and ``p >= t - recent_t``; ``recent_t`` = ``recent``, or
  ``max(budget_t - sink, 0)`` when the budget is given.
- h2o / scissorhands / knorm: ``protected_t`` = ``recent`` if given else ``budget_t // 2``;
  candidates are the held keys with ``p <= t - 1 - protected_t``; when the head holds more
  than ``budget_t`` keys, ``held - budget_t`` candidates go (all of them if fewer), highest
  drop priority first, ties to the older position.
  h2o: priority = -(attention accumulated over every query that saw the key, summed over
  the group's query heads). scissorhands: priority = how many of queries t-w+1..t found the
  key unimportant (every head of the group gave it < 1/len(keys that query attended to)).
  knorm: priority = the L2 norm of the cached key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from corm_reference import greedy_decode, load_reference, reference_buffers

POLICIES = ("streaming", "h2o", "scissorhands", "knorm")
SCISSORHANDS_WINDOW = 32


def budget_at(budget: int | float, t: int) -> int:
    """budget_t: an int is a number of tokens; a float f is max(1, floor(f * t + 0.5)) in float64."""
    if isinstance(budget, bool):
        raise TypeError("budget must be an int or a float")
    if isinstance(budget, int):
        return budget
    return max(1, math.floor(float(budget) * t + 0.5))


def protected_at(budget: int | float, recent: int | None, t: int) -> int:
    return recent if recent is not None else budget_at(budget, t) // 2


def streaming_recent_at(budget: int | float | None, recent: int | None, sink: int, t: int) -> int:
    return recent if budget is None else max(budget_at(budget, t) - sink, 0)


def streaming_keep(held: Sequence[int], t: int, budget, recent, sink: int) -> list[int]:
    r = streaming_recent_at(budget, recent, sink, t)
    return [p for p in held if p < sink or p >= t - r]


def budget_drop(held: Sequence[int], t: int, budget, recent, priority: dict[int, float]) -> list[int]:
    """The positions a fixed-budget policy drops at step t (``priority`` per candidate:
    higher goes first, ties to the older position)."""
    b = budget_at(budget, t)
    excess = len(held) - b
    if excess <= 0:
        return []
    prot = protected_at(budget, recent, t)
    candidates = [p for p in held if p <= t - 1 - prot]
    order = sorted(candidates, key=lambda p: (-priority[p], p))
    return order[:excess]


def expected_held_counts(n: int, seen: int, budget, recent) -> dict[int, int]:
    """What the fixed-budget rule implies for the number of keys a head holds after the
    eviction at each t = n..seen, whatever the priorities: the protected keys are never
    candidates (budget_t grows by at most one per step), so
    held_t = min(held_{t-1} + 1, max(budget_t, min(protected_t, t))), held_{n-1} + 1 := n."""
    counts = {}
    held = n - 1
    for t in range(n, seen + 1):
        floor_ = max(budget_at(budget, t), min(protected_at(budget, recent, t), t))
        held = min(held + 1, floor_)
        counts[t] = held
    return counts


def _rel(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale > 0 else 0.0


@dataclass
class BaselineRun:
    policy: str
    prompt_len: int
    new_tokens: list[int]
    kept: list[list[list[int]]]  # [layer][kv_head] -> sorted 0-indexed positions held
    seen: int  # tokens that went through the model
    # smallest relative gap between the last dropped and the first kept candidate's priority
    # (h2o scores, knorm norms), over every eviction; scissorhands: smallest relative
    # distance of a deciding probability to its 1/len threshold; smallest greedy logit gap
    decision_margin: float = math.inf
    threshold_margin: float = math.inf
    logit_gap: float = math.inf
    evictions: list[list[list[tuple[int, int]]]] = field(default_factory=list)  # (t, p)
    held_counts: list[list[dict[int, int]]] = field(default_factory=list)  # [layer][kv] t -> held after eviction
    step_logits: list[torch.Tensor] = field(default_factory=list)
    scores: list[list[dict[int, float]]] = field(default_factory=list)  # h2o: [layer][kv] p -> accumulated
    unimportant: list[list[dict[int, set[int]]]] = field(default_factory=list)  # scissorhands: u -> {p}

    def robust(self, tol: float = 1e-4, gap: float = 1e-4) -> bool:
        """True when fp32 rounding cannot plausibly flip a decision of this run."""
        return self.decision_margin >= tol and self.threshold_margin >= tol and self.logit_gap >= gap

    def evicted_any(self) -> bool:
        return any(len(head) < self.seen for layer in self.kept for head in layer)


def baseline_run(folder: str | Path, prompt_ids: Sequence[int], max_new_tokens: int, policy: str, *,
                 budget: int | float | None = None, recent: int | None = None, window: int | None = None,
                 sink: int = 4) -> BaselineRun:
    """Greedy generation of ``max_new_tokens`` tokens (never stopping early) under ``policy``.

    The last generated token is sampled but not fed back. ``policy="full"`` keeps everything.
    """
    if policy not in POLICIES + ("full",):
        raise ValueError(policy)
    if policy in ("h2o", "scissorhands", "knorm") and budget is None:
        raise ValueError("budget policies need a budget")
    if policy == "streaming" and (budget is None) == (recent is None):
        raise ValueError("streaming needs exactly one of budget / recent")
    w = (window if window is not None else SCISSORHANDS_WINDOW)
    model, prompt, n, total, keys, values, scale = reference_buffers(folder, prompt_ids, max_new_tokens)
    L, KV = model.n_layers, model.n_kv
    kept: list[list[list[int]]] = [[[] for _ in range(KV)] for _ in range(L)]  # 0-indexed
    evictions: list[list[list[tuple[int, int]]]] = [[[] for _ in range(KV)] for _ in range(L)]
    held_counts: list[list[dict[int, int]]] = [[{} for _ in range(KV)] for _ in range(L)]
    scores: list[list[dict[int, float]]] = [[{} for _ in range(KV)] for _ in range(L)]
    unimportant: list[list[dict[int, set[int]]]] = [[{} for _ in range(KV)] for _ in range(L)]
    norms: list[list[dict[int, float]]] = [[{} for _ in range(KV)] for _ in range(L)]
    margins = {"decision": math.inf, "threshold": math.inf}
    bias = model.key_bias(torch.arange(total))  # [heads, total], by each key's own position

    def verdicts(layer: int, kv: int, u: int, held: list[int], probs: list[list[float]]) -> None:
        """Query u's scissorhands verdicts on the keys ``held`` it attended to: probs[h][i]
        is head h's probability on held[i]."""
        thr_len = len(held)
        bad = set()
        for i, p in enumerate(held):
            assert p <= u - 1
            below = [a < 1.0 / thr_len for a in (row[i] for row in probs)]
            dist = [abs(row[i] * thr_len - 1.0) for row in probs]
            if all(below):
                bad.add(p)
                m = min(dist)  # any head crossing up would flip the verdict
            else:
                m = max(x for x, b in zip(dist, below) if not b)  # every head above must cross down
            if thr_len > 1:  # a single key gets probability 1 = 1/1 exactly, in any precision
                margins["threshold"] = min(margins["threshold"], m)
        unimportant[layer][kv][u] = bad

    def priority(layer: int, kv: int, p: int, t: int) -> float:
        if policy == "h2o":
            return -scores[layer][kv][p]
        if policy == "knorm":
            return norms[layer][kv][p]
        return float(sum(1 for u in range(max(1, t - w + 1), t + 1) if p in unimportant[layer][kv].get(u, ())))

    def evict(layer: int, kv: int, t: int) -> None:
        held = kept[layer][kv]
        if policy == "full":
            after = list(held)
        elif policy == "streaming":
            after = streaming_keep(held, t, budget, recent, sink)
        else:
            prio = {p: priority(layer, kv, p, t) for p in held}
            drop = budget_drop(held, t, budget, recent, prio)
            b = budget_at(budget, t)
            prot = protected_at(budget, recent, t)
            candidates = sorted((p for p in held if p <= t - 1 - prot), key=lambda p: (-prio[p], p))
            excess = len(held) - b
            if policy in ("h2o", "knorm") and 0 < excess < len(candidates):
                last_dropped, first_kept = candidates[excess - 1], candidates[excess]
                margins["decision"] = min(margins["decision"], _rel(prio[last_dropped], prio[first_kept]))
            after = [p for p in held if p not in set(drop)]
        evictions[layer][kv] += [(t, p) for p in held if p not in after]
        kept[layer][kv] = after
        held_counts[layer][kv][t] = len(after)

    # -- prefill: full causal attention over the prompt, then one eviction at t = n -------
    x = model.embed[torch.tensor(prompt)]
    pos = torch.arange(n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()

    def prefill_attend(layer: int, q, k, v) -> torch.Tensor:
        keys[layer][:, :n] = k
        values[layer][:, :n] = v
        outs = [None] * model.n_heads
        for kv in range(KV):
            probs = {}
            for head in model.group(kv):
                s = q[head] @ k[kv].T * scale + bias[head, :n]
                a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
                outs[head] = a @ v[kv]
                probs[head] = a.tolist()
            kept[layer][kv] = list(range(n))
            for p in range(n):
                norms[layer][kv][p] = float(torch.linalg.vector_norm(k[kv, p]))
                # every prompt query u (1-indexed) with p <= u - 1 saw key p
                scores[layer][kv][p] = sum(probs[h][u - 1][p] for h in model.group(kv) for u in range(p + 1, n + 1))
            if policy == "scissorhands":
                for u in range(max(1, n - w + 1), n + 1):  # the last min(w, n) prompt queries
                    verdicts(layer, kv, u, list(range(u)), [probs[h][u - 1][:u] for h in model.group(kv)])
            evict(layer, kv, n)
        return torch.stack(outs, 1).reshape(n, -1)

    def decode_attend(layer: int, t: int, q, k, v) -> torch.Tensor:
        keys[layer][:, t - 1] = k[:, 0]
        values[layer][:, t - 1] = v[:, 0]
        outs = [None] * model.n_heads
        for kv in range(KV):
            held = kept[layer][kv] + [t - 1]
            kept[layer][kv] = held
            norms[layer][kv][t - 1] = float(torch.linalg.vector_norm(k[kv, 0]))
            scores[layer][kv][t - 1] = 0.0
            idx = torch.tensor(held)
            K, V = keys[layer][kv, idx], values[layer][kv, idx]
            probs = []
            for head in model.group(kv):
                a = torch.softmax(q[head, 0] @ K.T * scale + bias[head, idx], -1)
                outs[head] = a @ V
                probs.append(a.tolist())
            for i, p in enumerate(held):
                scores[layer][kv][p] += sum(row[i] for row in probs)
            if policy == "scissorhands":
                verdicts(layer, kv, t, held, probs)
            evict(layer, kv, t)
        return torch.cat(outs, -1)[None]

    new_tokens, step_logits, gap = greedy_decode(model, x, pos, n, max_new_tokens, prefill_attend, decode_attend)

    return BaselineRun(policy=policy, prompt_len=n, new_tokens=new_tokens, kept=kept, seen=total,
                       decision_margin=margins["decision"], threshold_margin=margins["threshold"], logit_gap=gap,
                       evictions=evictions, held_counts=held_counts, step_logits=step_logits, scores=scores,
                       unimportant=unimportant)


def full_attention(folder: str | Path, ids: Sequence[int]) -> list[list[torch.Tensor]]:
    """[layer][head] -> dense [T, T] causal attention of a plain full forward of ``ids``
    (a second, batched path used to check the reference's bookkeeping)."""
    model = load_reference(folder)
    x = model.embed[torch.tensor(list(ids))]
    T = x.shape[0]
    pos = torch.arange(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    bias = model.key_bias(pos)
    out: list[list[torch.Tensor]] = []

    def attend(q, k, v):
        mats, outs = [], []
        for head in range(model.n_heads):
            kv = head // (model.n_heads // model.n_kv)
            s = (q[head] @ k[kv].T) / math.sqrt(model.head_dim) + bias[head]
            a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
            mats.append(a)
            outs.append(a @ v[kv])
        out.append(mats)
        return torch.stack(outs, 1).reshape(T, -1)

    for layer in range(model.n_layers):
        x = model.block(x, layer, pos, attend)
    return out
