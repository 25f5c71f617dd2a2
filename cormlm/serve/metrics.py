"""``GET /metrics``: the engine's state in Prometheus' text exposition format (version 0.0.4)."""

from __future__ import annotations

from .scheduler import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name, type, help, EngineStats field
SERIES = (
    ("cormlm_requests_running", "gauge", "Requests decoding in the running batch", "running"),
    ("cormlm_requests_prefilling", "gauge", "Admitted requests still prefilling their prompt", "prefilling"),
    ("cormlm_requests_waiting", "gauge", "Requests queued for admission", "waiting"),
    ("cormlm_requests_running_peak", "gauge", "Most requests ever running at once", "peak_running"),
    ("cormlm_generation_tokens_per_second", "gauge", "Tokens decoded per second over the last 10 s",
     "tokens_per_second"),
    ("cormlm_kv_bytes_budget", "gauge", "The KV memory budget (--kv-memory)", "kv_budget"),
    ("cormlm_kv_bytes_in_use", "gauge", "Bytes of the cache blocks requests own (what the budget counts)",
     "kv_bytes_in_use"),
    ("cormlm_kv_bytes_held", "gauge", "Bytes of every tensor the caches hold, spare pool capacity included",
     "kv_bytes_held"),
    ("cormlm_kv_retained_fraction", "gauge", "Keys the running requests' caches keep over the keys they saw",
     "retained_fraction"),
    ("cormlm_prompt_tokens_total", "counter", "Prompt tokens of accepted requests", "prompt_tokens_total"),
    ("cormlm_generated_tokens_total", "counter", "Tokens sampled, recomputation after preemption included",
     "generated_tokens_total"),
    ("cormlm_requests_preempted_total", "counter", "Requests preempted for memory and requeued",
     "preempted_total"),
    ("cormlm_requests_rejected_total", "counter", "Requests refused with 429 (queue full)", "rejected_total"),
)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def prometheus_text(stats: EngineStats) -> str:
    lines = []
    for name, kind, meaning, attribute in SERIES:
        lines += [f"# HELP {name} {meaning}", f"# TYPE {name} {kind}", f"{name} {_number(getattr(stats, attribute))}"]
    name = "cormlm_requests_finished_total"
    lines += [f"# HELP {name} Requests ended, by reason (stop, length, cancelled, error)", f"# TYPE {name} counter"]
    for reason, count in sorted(stats.finished_total.items()):
        lines.append(f'{name}{{reason="{reason}"}} {count}')
    free = max(stats.kv_budget - stats.kv_bytes_in_use, 0)
    lines += ["# HELP cormlm_kv_bytes_free Budget not in use: what admission can give new requests",
              "# TYPE cormlm_kv_bytes_free gauge", f"cormlm_kv_bytes_free {free}"]
    return "\n".join(lines) + "\n"
