"""A naive, independent reference of CORM (docs/corm.md), written only from that contract.

Nothing here is shared with ``cormlm``: the model is a float64 Llama-family or Falcon
forward pass that reads the checkpoint's ``model.safetensors`` by its Hugging Face tensor
names (Falcon: written from transformers' modeling_falcon, ALiBi included), and
the eviction rule is the literal one of the paper: a dense boolean message matrix per
(layer, KV head) whose row ``j`` says which keys query ``j`` found important. No
``last_important`` shortcut is used; the tests compare cormlm against this.

Conventions: query steps ``t`` and key positions ``i`` are 1-indexed inside the CORM
functions (as in docs/corm.md); what ``reference_generate`` returns is 0-indexed, like
``cormlm``'s ``cache.positions()``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

# ----------------------------------------------------------------------------------------
# CORM's rule on a literal message matrix
# ----------------------------------------------------------------------------------------


def _imp(important, query: int, key: int) -> bool:
    """important[query-1][key-1]; a query says nothing for a key that did not exist yet."""
    if key > query:
        return False
    row = important[query - 1]
    if key - 1 >= len(row):
        return False
    return bool(row[key - 1])


def long_term_minor(important, t: int, window: int, key: int) -> bool:
    """docs/corm.md rule 4: key ``key`` was unimportant to every one of queries t-w+1..t, and t >= w.

    ``important`` is a dense boolean matrix (nested lists or a 2-D tensor) with one row per
    query 1..T and one column per key 1..T: ``important[j-1][i-1]`` iff a_j[i] >= 1/j.
    """
    if t < window:
        return False
    if isinstance(important, torch.Tensor):  # same rule, vectorised over the window's rows
        rows = important[max(t - window, key - 1) : t, key - 1]  # queries max(t-w+1, key) .. t
        return not bool(rows.any())
    return not any(_imp(important, j, key) for j in range(t - window + 1, t + 1))


def corm_step(important, t: int, window: int, recent: int, kept: Iterable[int]) -> list[int]:
    """docs/corm.md rule 5 at step ``t``: the 1-indexed keys still held after evicting every
    long-term-minor key whose position is <= t - r."""
    return sorted(i for i in kept if not (i <= t - recent and long_term_minor(important, t, window, i)))


def memory_end(important, share, t: int, window: int, magnitude: float, key: int) -> float:
    """CORM's ``magnitude`` option: the step at which the memory of ``key`` ends, the latest
    over the queries j <= t that marked it of j + w * (1 + m * log2 share[j-1][key-1]), where
    share is how many times alpha/j the key got (max over the group); never marked: w."""
    ends = [j + window * (1 + magnitude * math.log2(float(share[j - 1][key - 1])))
            for j in range(key, t + 1) if _imp(important, j, key)]
    return max(ends, default=float(window))


def magnitude_corm_step(important, share, t: int, window: int, recent: int, magnitude: float,
                        kept: Iterable[int]) -> list[int]:
    """CORM with ``magnitude``: rule 5, a key being long-term minor once its memory has ended."""
    return sorted(i for i in kept
                  if not (i <= t - recent and memory_end(important, share, t, window, magnitude, i) <= t))


def bounded_corm_step(important, t: int, recent: int, kept: Iterable[int], budget_t: int,
                      memory: Callable[[int], float] | None = None) -> list[int]:
    """Bounded CORM at step ``t``, after the rule of :func:`corm_step`: while more than
    ``budget_t`` keys are held, drop among the keys older than the ``recent`` newest the one
    whose last marking query is oldest (never marked: 0), the older key among equals
    (``memory``: the one whose memory ends first, :func:`memory_end`)."""
    held = sorted(kept)

    def last_marked(key: int) -> float:
        if memory is not None:
            return memory(key)
        return max((j for j in range(key, t + 1) if _imp(important, j, key)), default=0)

    candidates = sorted((i for i in held if i <= t - recent), key=lambda i: (last_marked(i), i))
    drop = set(candidates[:max(len(held) - budget_t, 0)])
    return [i for i in held if i not in drop]


def corm_step_last_important(last_important: dict[int, int | None], t: int, window: int, recent: int) -> list[int]:
    """docs/corm.md's O(n) restatement, for checking the equivalence it claims: ``last_important``
    maps each kept key to the last step that marked it (None: never)."""
    def minor(i: int) -> bool:
        last = last_important[i]
        return t >= window and (last is None or last <= t - window)

    return sorted(i for i in last_important if not (i <= t - recent and minor(i)))


def worked_example() -> tuple[list[int], list[int]]:
    """docs/corm.md's worked example (one head, w = 3, r = 2, prompt of 5).

    Returns (kept after prefill, kept after step 6 when query 6 marks keys 1, 4 and 6 but
    not 3), both 1-indexed.
    """
    x, o = True, False
    important = [
        [x, o, o, o, o, o],  # t=1 (outside the window at t = 5)
        [x, x, o, o, o, o],  # t=2 (outside the window at t = 5)
        [x, o, x, o, o, o],  # t=3
        [x, o, o, x, o, o],  # t=4
        [x, o, o, o, x, o],  # t=5
        [x, o, o, x, o, x],  # t=6: key 3 unmarked
    ]
    after_prefill = corm_step(important, 5, 3, 2, range(1, 6))
    after_6 = corm_step(important, 6, 3, 2, after_prefill + [6])
    return after_prefill, after_6


# ----------------------------------------------------------------------------------------
# The float64 Llama-family model
# ----------------------------------------------------------------------------------------


class ReferenceModel:
    """Weights of a Llama / Mistral / Falcon checkpoint folder, in float64, by HF tensor names.

    Falcon layouts (as transformers' modeling_falcon): ``new_decoder_architecture`` (fused
    QKV grouped per KV head as [q.., k, v]; ``ln_attn`` + ``ln_mlp`` or one
    ``input_layernorm``), ``multi_query`` (all q heads, then one k, one v) and the
    interleaved per-head [q, k, v] of Falcon-RW; parallel or sequential residual; rotary or
    ALiBi positions.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        self.config = cfg
        self.falcon = cfg.get("model_type") == "falcon"
        self.hidden = cfg["hidden_size"]
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        if self.falcon:
            self._falcon_config(cfg)
        else:
            self.n_kv = cfg.get("num_key_value_heads") or self.n_heads
            self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
            self.eps = cfg.get("rms_norm_eps", 1e-6)
            self.alibi = False
            if cfg.get("hidden_act", "silu") != "silu":
                raise ValueError("reference supports the SwiGLU (silu) MLP only")
            if cfg.get("sliding_window") and cfg.get("model_type") == "mistral":
                raise ValueError("reference has no sliding window")
        rope = cfg.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", (cfg.get("rope_scaling") or {}).get("rope_type", "default"))
        if not self.alibi and (rope_type != "default" or cfg.get("rope_scaling")):
            raise ValueError(f"reference supports the default RoPE only, got {rope_type!r}")
        self.theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))

        weights: dict[str, torch.Tensor] = {}
        files = sorted(folder.glob("*.safetensors"))
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    weights[name] = f.get_tensor(name).to(torch.float64)
        self.w = weights
        self.embed = weights["transformer.word_embeddings.weight" if self.falcon else "model.embed_tokens.weight"]
        self.lm_head = weights.get("lm_head.weight", self.embed)
        d = self.head_dim
        self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        self.slopes = self._alibi_slopes() if self.alibi else None

    def _falcon_config(self, cfg: dict) -> None:
        self.head_dim = self.hidden // self.n_heads
        self.eps = cfg.get("layer_norm_epsilon", 1e-5)
        self.new_arch = bool(cfg.get("new_decoder_architecture", False))
        self.multi_query = bool(cfg.get("multi_query", True))
        self.parallel = bool(cfg.get("parallel_attn", True))
        self.alibi = bool(cfg.get("alibi", False))
        if self.new_arch:
            self.n_kv = cfg.get("num_kv_heads") or self.n_heads
            self.layout = "grouped"
        elif self.multi_query:
            self.n_kv, self.layout = 1, "multi_query"
        else:
            self.n_kv, self.layout = self.n_heads, "interleaved"
        norms = cfg.get("num_ln_in_parallel_attn")
        if norms is None and self.new_arch:
            norms = 2
        # transformers: ln_attn + ln_mlp only with the new architecture, parallel, 2 norms
        self.two_norms = self.new_arch and self.parallel and norms == 2
        if self.new_arch and not self.parallel and not self.two_norms:
            raise ValueError("reference: new_decoder_architecture without parallel_attn is not a Falcon layout")
        if self.new_arch and self.alibi:
            raise ValueError("reference: new_decoder_architecture with alibi is not supported")
        if cfg.get("activation", "gelu") != "gelu":
            raise ValueError("reference supports Falcon's exact (erf) gelu MLP only")

    def _alibi_slopes(self) -> torch.Tensor:
        """The standard power-of-two ALiBi slopes, computed in float32 and rounded to bfloat16
        (as transformers' build_alibi_tensor), returned as float64 [heads]."""
        n = self.n_heads
        closest = 2 ** math.floor(math.log2(n))

        def powers(count: int, step: int, power: int) -> list[torch.Tensor]:
            base = torch.tensor(2 ** (-(2 ** -(math.log2(power) - 3))), dtype=torch.float32)
            return [torch.pow(base, torch.tensor(e, dtype=torch.int32)) for e in range(1, 1 + step * count, step)]

        slopes = powers(closest, 1, closest)
        if closest != n:
            slopes += powers(min(closest, n - closest), 2, 2 * closest)
        return torch.stack(slopes).to(torch.bfloat16).to(torch.float64)

    # -- pieces ------------------------------------------------------------------------

    def lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.w[name + ".weight"]

    def layer_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [..., T, d] at 0-indexed positions pos [T]: half-split (rotate_half) layout."""
        ang = pos.to(torch.float64)[:, None] * self.inv_freq[None, :]
        cos = torch.cat([ang.cos(), ang.cos()], -1)
        sin = torch.cat([ang.sin(), ang.sin()], -1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def key_bias(self, pos: torch.Tensor) -> torch.Tensor:
        """[heads, len(pos)] float64 added to the scaled scores of keys at 0-indexed positions
        ``pos`` (absolute, padding not counted): ALiBi's ``bf16(slope * bf16(pos)) / sqrt(d)``
        (only the key's position matters: the query's share is constant per row), else 0."""
        if not self.alibi:
            return torch.zeros(self.n_heads, len(pos), dtype=torch.float64)
        pos_bf16 = pos.to(torch.bfloat16)[None, :]
        product = (self.slopes.to(torch.bfloat16)[:, None] * pos_bf16).to(torch.float64)
        return product / math.sqrt(self.head_dim)

    def mlp(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if self.falcon:
            p = f"transformer.h.{layer}.mlp."
            return self.lin(torch.nn.functional.gelu(self.lin(x, p + "dense_h_to_4h")), p + "dense_4h_to_h")
        p = f"model.layers.{layer}.mlp."
        gate = self.lin(x, p + "gate_proj")
        return self.lin(torch.nn.functional.silu(gate) * self.lin(x, p + "up_proj"), p + "down_proj")

    def qkv(self, x: torch.Tensor, layer: int, pos: torch.Tensor):
        """x [T, H] -> q [heads, T, d], k [kv, T, d], v [kv, T, d] with RoPE applied (not with ALiBi)."""
        T, d = x.shape[0], self.head_dim
        if self.falcon:
            fused = self.lin(x, f"transformer.h.{layer}.self_attention.query_key_value")
            if self.layout == "grouped":  # per KV head: [q of the group..., k, v]
                g = fused.view(T, self.n_kv, self.n_heads // self.n_kv + 2, d)
                q, k, v = g[:, :, :-2].reshape(T, self.n_heads, d), g[:, :, -2], g[:, :, -1]
            elif self.layout == "multi_query":  # all q heads, then one k, one v
                g = fused.view(T, self.n_heads + 2, d)
                q, k, v = g[:, :-2], g[:, -2:-1], g[:, -1:]
            else:  # interleaved per head: [q, k, v]
                g = fused.view(T, self.n_heads, 3, d)
                q, k, v = g[:, :, 0], g[:, :, 1], g[:, :, 2]
            q, k, v = (y.transpose(0, 1) for y in (q, k, v))
        else:
            p = f"model.layers.{layer}.self_attn."
            q = self.lin(x, p + "q_proj").view(T, self.n_heads, d).transpose(0, 1)
            k = self.lin(x, p + "k_proj").view(T, self.n_kv, d).transpose(0, 1)
            v = self.lin(x, p + "v_proj").view(T, self.n_kv, d).transpose(0, 1)
        if self.alibi:
            return q, k, v
        return self.rope(q, pos), self.rope(k, pos), v

    def group(self, kv_head: int) -> range:
        per = self.n_heads // self.n_kv
        return range(kv_head * per, (kv_head + 1) * per)

    def block(self, x: torch.Tensor, layer: int, pos: torch.Tensor, attend) -> torch.Tensor:
        """One decoder layer on x [T, H] at 0-indexed positions pos [T].

        ``attend(q, k, v)`` (shapes as ``qkv`` returns) does the attention and returns the
        heads' outputs [T, heads * d]; the layer does the norms, projections and residuals.
        """
        if not self.falcon:
            h = self.rms(x, f"model.layers.{layer}.input_layernorm")
            attn = self.lin(attend(*self.qkv(h, layer, pos)), f"model.layers.{layer}.self_attn.o_proj")
            x = x + attn
            return x + self.mlp(self.rms(x, f"model.layers.{layer}.post_attention_layernorm"), layer)
        p = f"transformer.h.{layer}."
        h = self.layer_norm(x, p + ("ln_attn" if self.two_norms else "input_layernorm"))
        attn = self.lin(attend(*self.qkv(h, layer, pos)), p + "self_attention.dense")
        if self.parallel or self.new_arch:
            h_mlp = self.layer_norm(x, p + "ln_mlp") if self.two_norms else h
            return x + attn + self.mlp(h_mlp, layer)
        x = x + attn
        return x + self.mlp(self.layer_norm(x, p + "post_attention_layernorm"), layer)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """Last norm and LM head: x [..., H] -> logits [..., vocab]."""
        if self.falcon:
            return self.layer_norm(x, "transformer.ln_f") @ self.lm_head.T
        return self.rms(x, "model.norm") @ self.lm_head.T

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Plain full causal forward of one sequence: [T, vocab] float64 logits."""
        x = self.embed[torch.tensor(list(ids))]
        T = x.shape[0]
        pos = torch.arange(T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        bias = self.key_bias(pos)

        def attend(q, k, v):
            outs = []
            for head in range(self.n_heads):
                kv = head // (self.n_heads // self.n_kv)
                s = (q[head] @ k[kv].T) / math.sqrt(self.head_dim) + bias[head]
                a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
                outs.append(a @ v[kv])
            return torch.stack(outs, 1).reshape(T, self.n_heads * self.head_dim)

        for layer in range(self.n_layers):
            x = self.block(x, layer, pos, attend)
        return self.final(x)


_MODELS: dict[str, ReferenceModel] = {}


def load_reference(folder: str | Path) -> ReferenceModel:
    key = str(Path(folder).resolve())
    if key not in _MODELS:
        _MODELS[key] = ReferenceModel(folder)
    return _MODELS[key]


def reference_logits(folder: str | Path, ids: Sequence[int]) -> torch.Tensor:
    return load_reference(folder).logits(ids)


# ----------------------------------------------------------------------------------------
# Generation with the CORM cache, one sequence, one KV head at a time
# ----------------------------------------------------------------------------------------


@dataclass
class ReferenceRun:
    new_tokens: list[int]
    kept: list[list[list[int]]]  # [layer][kv_head] -> sorted 0-indexed positions held
    seen: int  # tokens that went through the model (prompt + fed-back generated tokens)
    # [layer][kv_head] -> dense bool matrix [seen, seen]: important[j-1, i-1] iff key i
    # mattered to query j (union over the group's query heads)
    important: list[list[torch.Tensor]]
    window: int | None
    recent: int | None
    # smallest |a * t - 1| over every importance decision that could count (how close the
    # run came to the 1/t threshold), and the smallest top-1 / top-2 logit gap
    threshold_margin: float = math.inf
    logit_gap: float = math.inf
    evictions: list[list[list[tuple[int, int]]]] = field(default_factory=list)  # (t, key) 1-indexed
    step_logits: list[torch.Tensor] = field(default_factory=list)  # the logits each new token came from

    def robust(self, threshold: float = 1e-4, gap: float = 1e-4) -> bool:
        """True when fp32 rounding cannot plausibly flip a decision of this run."""
        return self.threshold_margin >= threshold and self.logit_gap >= gap

    def minor_keys(self, layer: int, kv_head: int) -> list[int]:
        """0-indexed positions long-term minor at the last step t = seen (literal matrix rule)."""
        mat = self.important[layer][kv_head].tolist()
        return [i - 1 for i in range(1, self.seen + 1) if long_term_minor(mat, self.seen, self.window, i)]


def _gap(logits: torch.Tensor) -> float:
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def greedy_decode(model, x: torch.Tensor, pos: torch.Tensor, n: int, max_new_tokens: int,
                  prefill_attend, decode_attend) -> tuple[list[int], list[torch.Tensor], float]:
    """The references' shared driver: prefill the ``n`` prompt embeddings ``x`` through every
    layer with ``prefill_attend(layer, q, k, v)``, then greedy decoding one token at a time
    with ``decode_attend(layer, t, q, k, v)`` (``t``: 1-indexed position of the token fed
    back). Returns the new tokens, the logits each was chosen from, and the smallest gap
    between the two best logits (how robust the greedy choices are to rounding)."""
    L = model.n_layers
    for layer in range(L):
        x = model.block(x, layer, pos, lambda q, k, v, layer=layer: prefill_attend(layer, q, k, v))
    logits = model.final(x[-1])
    new_tokens: list[int] = []
    step_logits: list[torch.Tensor] = []
    gap = math.inf
    for step in range(max_new_tokens):
        step_logits.append(logits)
        gap = min(gap, _gap(logits))
        token = int(torch.argmax(logits))
        new_tokens.append(token)
        if step == max_new_tokens - 1:
            break
        t = n + step + 1  # 1-indexed position of the token fed back
        x = model.embed[token][None]
        p = torch.tensor([t - 1])
        for layer in range(L):
            x = model.block(x, layer, p, lambda q, k, v, layer=layer, t=t: decode_attend(layer, t, q, k, v))
        logits = model.final(x[0])
    return new_tokens, step_logits, gap


def reference_buffers(folder: str | Path, prompt_ids: Sequence[int], max_new_tokens: int):
    """What every naive policy run starts from: the model, the prompt, its length n, the
    tokens the run will see, float64 key/value buffers [layer][KV, total, D] of every key
    ever computed (eviction only removes positions from the kept lists) and the scale."""
    model = load_reference(folder)
    prompt = list(prompt_ids)
    n = len(prompt)
    if n == 0:
        raise ValueError("empty prompt")
    total = n + max(max_new_tokens - 1, 0)
    keys = [torch.zeros(model.n_kv, total, model.head_dim, dtype=torch.float64) for _ in range(model.n_layers)]
    values = [torch.zeros(model.n_kv, total, model.head_dim, dtype=torch.float64) for _ in range(model.n_layers)]
    return model, prompt, n, total, keys, values, 1.0 / math.sqrt(model.head_dim)


def reference_run(folder: str | Path, prompt_ids: Sequence[int], max_new_tokens: int, window: int | None,
                  recent: int | None, corm_policy: bool = True, budget: int | float | None = None,
                  threshold: float = 1.0, magnitude: float | None = None) -> ReferenceRun:
    """Greedy generation of ``max_new_tokens`` tokens (never stopping early) with CORM.

    The last generated token is sampled but not fed back, like a generation loop does.
    ``corm_policy=False`` (or ``window=None``) keeps every key; ``budget`` bounds it
    (:func:`bounded_corm_step`, tokens or a fraction of the tokens seen); ``threshold`` is
    the alpha of CORM's ``threshold`` option: important iff a >= alpha / t; ``magnitude``
    CORM's option of that name (:func:`memory_end`; every prompt query counts).
    """
    corm = corm_policy and window is not None
    if corm and (window < 1 or recent is None or recent < 0):
        raise ValueError("window must be >= 1 and recent >= 0")
    model, prompt, n, total, keys, values, scale = reference_buffers(folder, prompt_ids, max_new_tokens)
    L, KV = model.n_layers, model.n_kv
    important = [[torch.zeros(total, total, dtype=torch.bool) for _ in range(KV)] for _ in range(L)]
    # share[j-1, i-1]: how many times alpha/j query j gave key i (max over the group)
    share = [[torch.zeros(total, total, dtype=torch.float64) for _ in range(KV)] for _ in range(L)]
    kept: list[list[list[int]]] = [[[] for _ in range(KV)] for _ in range(L)]  # 1-indexed
    evictions: list[list[list[tuple[int, int]]]] = [[[] for _ in range(KV)] for _ in range(L)]
    margin = math.inf

    def first_counted_query() -> int:
        # queries before n - w + 1 never enter any window (the first eviction is at t = n)
        if magnitude:
            return 1 if corm else total + 1
        return max(1, n - window + 1) if corm else total + 1

    def evict(layer: int, head: int, t: int) -> None:
        nonlocal margin
        if not corm:
            return
        before = kept[layer][head]
        memory = None
        if magnitude:
            def memory(key: int) -> float:
                return memory_end(important[layer][head], share[layer][head], t, window, magnitude, key)

            after = magnitude_corm_step(important[layer][head], share[layer][head], t, window, recent, magnitude,
                                        before)
            ends = [memory(i) for i in before if i <= t - recent]
            margin = min([margin] + [abs(end - t) / t for end in ends])
        else:
            after = corm_step(important[layer][head], t, window, recent, before)
        if budget is not None:
            budget_t = budget if isinstance(budget, int) else max(1, math.floor(float(budget) * t + 0.5))
            after = bounded_corm_step(important[layer][head], t, recent, after, budget_t, memory)
        evictions[layer][head] += [(t, i) for i in before if i not in after]
        kept[layer][head] = after

    # -- prefill: full causal attention, then one eviction at t = n ----------------------
    x = model.embed[torch.tensor(prompt)]
    pos = torch.arange(n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    thresholds = threshold / torch.arange(1, n + 1, dtype=torch.float64)  # row j-1: alpha/j
    bias = model.key_bias(torch.arange(total))  # [heads, total]: by each key's own position

    def prefill_attend(layer: int, q, k, v) -> torch.Tensor:
        nonlocal margin
        keys[layer][:, :n] = k
        values[layer][:, :n] = v
        outs = [None] * model.n_heads
        for kv in range(KV):
            mark = torch.zeros(n, n, dtype=torch.bool)
            for head in model.group(kv):
                s = q[head] @ k[kv].T * scale + bias[head, :n]
                a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
                outs[head] = a @ v[kv]
                mark |= (a >= thresholds[:, None]) & causal
                share[layer][kv][:n, :n] = torch.maximum(share[layer][kv][:n, :n], a / thresholds[:, None])
                # query 1 (a = 1 = 1/1 exactly, in any precision) is no rounding risk
                lo = max(first_counted_query() - 1, 1)
                if lo < n:
                    rel = (a[lo:] / thresholds[lo:, None] - 1).abs()[causal[lo:]]
                    margin = min(margin, float(rel.min()))
            important[layer][kv][:n, :n] = mark
            kept[layer][kv] = list(range(1, n + 1))
            evict(layer, kv, n)
        return torch.stack(outs, 1).reshape(n, -1)

    def decode_attend(layer: int, t: int, q, k, v) -> torch.Tensor:
        nonlocal margin
        keys[layer][:, t - 1] = k[:, 0]
        values[layer][:, t - 1] = v[:, 0]
        outs = [None] * model.n_heads
        for kv in range(KV):
            kept[layer][kv] = kept[layer][kv] + [t]
            idx = torch.tensor(kept[layer][kv]) - 1
            K, V = keys[layer][kv, idx], values[layer][kv, idx]
            mark = torch.zeros(t, dtype=torch.bool)
            for head in model.group(kv):
                a = torch.softmax(q[head, 0] @ K.T * scale + bias[head, idx], -1)
                outs[head] = a @ V
                mark[idx] |= a >= threshold / t
                share[layer][kv][t - 1, idx] = torch.maximum(share[layer][kv][t - 1, idx], a * t / threshold)
                if corm:
                    margin = min(margin, float((a * t / threshold - 1).abs().min()))
            important[layer][kv][t - 1, :t] = mark
            evict(layer, kv, t)
        return torch.cat(outs, -1)[None]

    new_tokens, step_logits, gap = greedy_decode(model, x, pos, n, max_new_tokens, prefill_attend, decode_attend)

    kept0 = [[[i - 1 for i in head] for head in layer] for layer in kept]
    return ReferenceRun(new_tokens=new_tokens, kept=kept0, seen=total,
                        important=important, window=window if corm else None, recent=recent if corm else None,
                        threshold_margin=margin, logit_gap=gap, evictions=evictions,
                        step_logits=step_logits)


def reference_generate(folder: str | Path, prompt_ids: Sequence[int], max_new_tokens: int, window: int | None,
                       recent: int | None, corm_policy: bool = True) -> tuple[list[int], list[list[list[int]]]]:
    """(new tokens, kept[layer][kv_head] sorted 0-indexed positions) after greedy generation."""
    run = reference_run(folder, prompt_ids, max_new_tokens, window, recent, corm_policy)
    return run.new_tokens, run.kept
