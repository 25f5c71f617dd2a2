"""``cormlm serve`` under load: full cache against CORM in the same KV memory.

    python scripts/bench_serve.py                      # SmolLM2-135M, 16 clients, 2k-token prompts, 512MiB
    python scripts/bench_serve.py --clients 8 --prompt-tokens 1000 --kv-memory 256MiB
    python scripts/bench_serve.py --quick              # the embedded toy, tiny settings (the test runs this)

For each policy the script starts the server itself (``cormlm serve`` in a subprocess on a
free loopback port, one policy at a time, the same ``--kv-memory`` and ``--max-batch``),
sends every client's request at once (one thread per client, the official ``openai``
client, greedy, ``--max-tokens`` each), and reads ``/metrics`` when all have answered.
Each client's prompt is the first ``--prompt-tokens`` tokens of a different Python standard
library file, sent as token ids so every prompt has exactly that length.

Per policy: peak requests running at once (the server's own count, per decode step),
throughput (completion tokens per second of wall time, first request sent to last answer),
end-to-end latency percentiles, preemptions. Then, unless ``--no-solo``, every prompt is
generated alone in this process with the same cache settings (``cormlm.generate``), and
the table says how many served answers equal their solo answer: batching, admission and
preemption must not change a greedy answer. The last line counts the requests whose answer
is the same under both policies (CORM evicts, so it may differ; that is quality, not
serving). The machine is named first.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench_decode import describe_machine

CORMLM = str(Path(sys.executable).parent / "cormlm")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the process that started it dies, so a
    killed test or benchmark never leaves a server behind."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass


class ServerProcess:
    """``cormlm serve ARGS`` on a free loopback port, ready (``/health`` answers) on entry,
    stopped (SIGINT, then SIGKILL) on exit; its output goes to ``log``."""

    def __init__(self, args: list[str], log: Path, ready_timeout: float = 300.0) -> None:
        self.args, self.log_path, self.ready_timeout = args, log, ready_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self._log = open(self.log_path, "w")  # closed in stop()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([CORMLM, "serve", "--port", str(self.port), *self.args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"cormlm serve exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"cormlm serve was not ready in {self.ready_timeout:.0f} s:\n{self.log_text()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {series (labels included): value}."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as answer:
            text = answer.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


# ------------------------------------------------------------------------ the run
@dataclass
class PolicyRun:
    policy: str
    flags: list[str]
    answers: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    peak_running: int = 0
    preempted: int = 0
    solo_matches: int | None = None


def stdlib_prompts(tokenizer, clients: int, tokens: int) -> list[list[int]]:
    """The first ``tokens`` tokens of ``clients`` different standard-library files, largest first."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in stdlib.glob("*.py") if p.stat().st_size > 8 * tokens), key=lambda p: p.name)
    prompts = []
    for path in files:
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= tokens:
            prompts.append(ids[:tokens])
        if len(prompts) == clients:
            return prompts
    raise SystemExit(f"only {len(prompts)} standard-library files hold {tokens} tokens; lower --prompt-tokens")


def run_policy(run: PolicyRun, args, prompts: list[list[int]], scratch: Path) -> None:
    from openai import OpenAI

    server_args = ["--model", str(args.model_path), "--model-name", "bench", "--kv-memory", args.kv_memory,
                   "--max-batch", str(args.max_batch), "--max-queue", str(len(prompts)), *run.flags]
    with ServerProcess(server_args, scratch / f"serve-{run.policy}.log") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=args.timeout)

        def ask(prompt: list[int]) -> tuple[str, int, float]:
            started = time.perf_counter()
            answer = client.completions.create(model="bench", prompt=prompt, max_tokens=args.max_tokens,
                                               temperature=0)
            return answer.choices[0].text, answer.usage.completion_tokens, time.perf_counter() - started

        started = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(ask, prompts))
        run.seconds = time.perf_counter() - started
        metrics = server.metrics()
    run.answers = [text for text, _, _ in results]
    run.completion_tokens = sum(n for _, n, _ in results)
    run.latencies = [seconds for _, _, seconds in results]
    run.peak_running = int(metrics["cormlm_requests_running_peak"])
    run.preempted = int(metrics["cormlm_requests_preempted_total"])


def solo_answers(model, tokenizer, cfg, prompts: list[list[int]], max_tokens: int) -> list[str]:
    import cormlm

    answers = []
    for prompt in prompts:
        out = cormlm.generate(model, [prompt], max_new_tokens=max_tokens, cache=cfg,
                              eos_token_id=tokenizer.eos_token_ids or None)
        answers.append(tokenizer.decode(out.new_tokens[0]))
    return answers


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def table(runs: list[PolicyRun], args, prompts: list[list[int]]) -> list[str]:
    lines = ["| policy | KV memory | clients | prompt tokens | peak running | preempted | throughput tok/s "
             "| p50 latency s | p90 latency s | served = solo |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        solo = "-" if run.solo_matches is None else f"{run.solo_matches}/{len(prompts)}"
        lines.append(f"| {run.policy} | {args.kv_memory} | {len(prompts)} | {len(prompts[0])} | {run.peak_running} "
                     f"| {run.preempted} | {run.completion_tokens / run.seconds:.1f} "
                     f"| {percentile(run.latencies, 50):.1f} | {percentile(run.latencies, 90):.1f} | {solo} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (default), weights, or a folder / .gguf / hub id")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-memory", default="512MiB")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=128, help="corm's w")
    parser.add_argument("--recent", type=int, default=128, help="corm's r")
    parser.add_argument("--no-solo", action="store_true", help="skip the solo generate check")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a client waits for its answer")
    parser.add_argument("--quick", action="store_true",
                        help="the embedded toy, 4 clients, 300-token prompts, 8 tokens, 3MiB: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.clients, args.prompt_tokens, args.max_tokens = "weights", 4, 300, 8
        args.kv_memory, args.window, args.recent = "3MiB", 32, 32
    return args


def main(argv: list[str] | None = None) -> list[PolicyRun]:
    import tempfile

    import cormlm
    from cormlm.checkpoint.real_model import resolve_model_argument

    args = parse_args(argv)
    args.model_path = resolve_model_argument(args.model)
    for line in describe_machine():
        print(line)
    tokenizer = cormlm.load_tokenizer(args.model_path)
    prompts = stdlib_prompts(tokenizer, args.clients, args.prompt_tokens)
    configs = {"full": cormlm.CacheConfig("full"),
               "corm": cormlm.CacheConfig("corm", window=args.window, recent=args.recent)}
    runs = [PolicyRun("full", ["--policy", "full"]),
            PolicyRun(f"corm w={args.window} r={args.recent}",
                      ["--policy", "corm", "--window", str(args.window), "--recent", str(args.recent)])]
    print(f"model {args.model} ({args.model_path}); {args.clients} clients at once, {args.prompt_tokens}-token "
          f"prompts, {args.max_tokens} greedy tokens each, --kv-memory {args.kv_memory}, --max-batch {args.max_batch}",
          flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for run in runs:
            run_policy(run, args, prompts, Path(scratch))
            print(f"{run.policy}: {run.seconds:.1f} s, peak {run.peak_running} running", flush=True)
    if not args.no_solo:
        model = cormlm.load_model(args.model_path)
        for run, cfg in zip(runs, configs.values()):
            solo = solo_answers(model, tokenizer, cfg, prompts, args.max_tokens)
            run.solo_matches = sum(a == b for a, b in zip(run.answers, solo))
    print()
    print("\n".join(table(runs, args, prompts)))
    same = sum(a == b for a, b in zip(runs[0].answers, runs[1].answers))
    ratio = runs[1].peak_running / max(runs[0].peak_running, 1)
    print(f"\nCORM ran {ratio:.2f}x the requests at once of a full cache in {args.kv_memory}; "
          f"{same}/{len(prompts)} answers are the same under both policies.")
    return runs


if __name__ == "__main__":
    main()
