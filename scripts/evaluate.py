"""What CORM buys on a trained model, beside every baseline at equal memory.

    python scripts/evaluate.py                  # SmolLM2-135M-Instruct (GGUF), 2k and 8k contexts
    python scripts/evaluate.py --contexts 4096  # one context
    python scripts/evaluate.py --model weights  # the embedded 12M toy (contexts up to 2048)
    python scripts/evaluate.py --quick          # tiny sizes, for tests (~1 minute on the toy)

Data: the Python standard library's files held out from the toy's training
(scripts/train_tiny.py), on every machine, read as one token stream.

Tasks, each at every context length L (``--contexts``):

1. ``perplexity`` with the cache in the loop: windows of L tokens; the first L - ``scored``
   are prefilled (the policy evicts), the last ``scored`` are fed one token at a time through
   the decoding path, evicting every step; only those count. Retained fraction and bytes
   held are sampled every 64 steps and averaged; the retained fraction per layer and KV
   head at the end is kept for the heat map.
2. ``passkey`` retrieval: "# The pass key is 12345." stated once, ``passkey_depth`` tokens
   before the end of an L-token prompt of code, then "# The pass key is"; the prompt is
   prefilled in chunks (the policy evicts between them, before the question is seen, as in
   a long conversation); correct when the first number generated is the key. The full cache's
   accuracy is the ceiling each policy is measured against (the 135M model solves it at
   ~1-2k tokens of distance, not at 7k: see docs/eval/README.md).
3. ``lines`` (optional): LongBench's next-line code completion after 1500 tokens of a
   file, scored by edit similarity (rapidfuzz) and exact match.

Policies: full; each CORM setting of ``--corm`` (``window=256,recent=256`` is the paper's
rule at its defaults; ``budget=`` bounds it); after each, every baseline (streaming, h2o,
scissorhands, knorm) with its budget set to the mean retained fraction that setting used,
so rows compare at equal memory (bytes are shown too). Writes results.md, results.json and
plots (quality against KV bytes kept; a heat map of what CORM keeps per layer and head).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shlex
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from plot_style import save_figure
from train_tiny import is_held_out, stdlib_files

import cormlm
from cormlm.checkpoint.real_model import REAL_MODEL, resolve_model_argument

ROOT = Path(__file__).resolve().parent.parent

BASELINES = ("streaming", "h2o", "scissorhands", "knorm")
TASKS = ("perplexity", "passkey", "lines")
SAMPLE_EVERY = 64  # decode steps between cache-stat samples
KEY_LINE, QUESTION = "\n# The pass key is {key}.\n", "\n# The pass key is"
ANSWER_TOKENS = 8  # generated after a pass-key prompt: the prompt is that much shorter than the context


@dataclass
class Sizes:
    contexts: list[int]  # window / prompt lengths in tokens
    windows: int  # perplexity windows per context (one batch)
    scored: int  # tokens decoded one at a time and scored at the end of each window
    passkey_cases: int
    passkey_depth: int  # tokens between the key and the question
    prefill_chunk: int  # passkey prompts are prefilled in chunks of this, evicting between
    lines: int  # next-line completion samples (task ``lines``)
    corm: list[str]  # CORM settings, "window=256,recent=256[,budget=0.5]"


DEFAULT = Sizes(contexts=[2048, 8192], windows=4, scored=256, passkey_cases=8, passkey_depth=1000,
                prefill_chunk=512, lines=8, corm=["window=256,recent=256"])
QUICK = Sizes(contexts=[384], windows=2, scored=32, passkey_cases=2, passkey_depth=96, prefill_chunk=64, lines=2,
              corm=["window=32,recent=32"])


@dataclass
class Row:
    context: int
    policy: str
    params: dict
    matched_to: str = ""  # the CORM setting whose memory a baseline was given
    retained_fraction: float = 0.0
    kv_bytes: float = 0.0  # mean bytes held during the perplexity run
    kv_bytes_full: float = 0.0  # what a full cache held at the same moments
    retained_by_head: list[list[float]] = field(default_factory=list)  # [layer][KV head], end of the run
    perplexity: float = float("nan")
    passkey: float = float("nan")
    edit_similarity: float = float("nan")
    exact_match: float = float("nan")
    seconds: float = 0.0
    answers: list[dict] = field(default_factory=list)

    def label(self) -> str:
        return self.policy + (" " + ",".join(f"{k}={v}" for k, v in self.params.items()) if self.params else "")


def parse_setting(text: str) -> dict:
    """"window=256,recent=256,budget=0.5" -> {"window": 256, "recent": 256, "budget": 0.5}."""
    params = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        try:
            params[name.strip()] = float(value) if "." in value else int(value)
        except ValueError:
            raise SystemExit(f"evaluate: error: '{part}' in '{text}' is not name=number "
                             "(e.g. window=256,recent=256,budget=0.5)") from None
    return params


# ------------------------------------------------------------------------------ data
def held_out_texts(stdlib: Path) -> list[tuple[str, str]]:
    """(relative path, text) of the held-out standard-library files, minus generated codec tables."""
    texts = []
    for path in stdlib_files(stdlib):
        rel = path.relative_to(stdlib).as_posix()
        if is_held_out(rel) and not rel.startswith("encodings/"):
            texts.append((rel, path.read_text(encoding="utf-8")))
    return texts


def token_stream(tok, texts) -> list[int]:
    ids: list[int] = []
    for _, text in texts:
        ids += tok.encode(text + "\n\n", add_special_tokens=False)
    return ids


def perplexity_windows(tok, stream: list[int], length: int, count: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens (BOS first), spread evenly over the stream."""
    span = length - 1
    if len(stream) < span:
        raise SystemExit(f"the held-out text holds {len(stream)} tokens, fewer than a {length}-token window")
    starts = [round(i * (len(stream) - span) / max(count - 1, 1)) for i in range(count)]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return torch.tensor([(bos + stream[s: s + span + (not bos)])[:length] for s in starts])


def passkey_prompts(tok, stream: list[int], length: int, sizes: Sizes, seed: int = 0) -> list[dict]:
    """Prompts that with their answer fill ``length`` tokens: code, the key line, ``passkey_depth``
    tokens of code, the question."""
    rng = random.Random(seed + length)
    question = tok.encode(QUESTION, add_special_tokens=False)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    cases = []
    for _ in range(sizes.passkey_cases):
        key = str(rng.randint(10000, 99999))
        key_line = tok.encode(KEY_LINE.format(key=key), add_special_tokens=False)
        before = length - ANSWER_TOKENS - len(bos) - len(key_line) - sizes.passkey_depth - len(question)
        start = rng.randrange(0, len(stream) - before - sizes.passkey_depth)
        filler = stream[start: start + before + sizes.passkey_depth]
        ids = bos + filler[:before] + key_line + filler[before:] + question
        cases.append({"key": key, "ids": ids})
    return cases


def line_samples(tok, texts, count: int, context: int = 1500) -> list[dict]:
    """Next-line targets after ``context`` tokens of a file (non-trivial lines), spread over the files."""
    samples = []
    for name, text in texts:
        lines = text.split("\n")
        offset = 0
        for i, line in enumerate(lines):
            if i and offset > 4 * context and len(line.strip()) >= 8 and not line.strip().startswith("#"):
                prefix = tok.encode(text[:offset - 1], add_special_tokens=False)
                if len(prefix) >= context:
                    samples.append({"file": name, "line": i + 1, "target": line.strip(),
                                    "ids": [tok.bos_token_id, *prefix[-context:]]})
                    break
            offset += len(line) + 1
        if len(samples) == count:
            break
    return samples


# ------------------------------------------------------------------------------ metrics
def edit_similarity(a: str, b: str) -> float:
    """2 x LCS(a, b) / (len a + len b), 1.0 for equal strings: rapidfuzz's normalised Indel
    similarity (``fuzz.ratio`` / 100), LongBench's code-completion measure."""
    from rapidfuzz import fuzz

    return fuzz.ratio(a, b) / 100


def first_line(generated: str) -> str:
    return generated.lstrip("\n").split("\n")[0].strip()


def first_number(generated: str) -> str:
    found = re.match(r"\s*(\d+)", generated)
    return found.group(1) if found else ""


@torch.inference_mode()
def run_perplexity(model, windows: torch.Tensor, scored: int, cfg: cormlm.CacheConfig, row: Row) -> None:
    cache = cormlm.make_cache(model, cfg, batch_size=windows.shape[0])
    prefix = windows.shape[1] - scored
    logits = model(windows[:, :prefix], cache=cache)[:, -1]
    nll, count, fractions, held, full = 0.0, 0, [], [], []
    for i in range(prefix, windows.shape[1]):
        nll += float(torch.nn.functional.cross_entropy(logits.float(), windows[:, i], reduction="sum"))
        count += windows.shape[0]
        if i + 1 < windows.shape[1]:
            logits = model(windows[:, i: i + 1], cache=cache)[:, -1]
        if (i - prefix) % SAMPLE_EVERY == 0 or i + 1 == windows.shape[1]:
            stats = cache.stats()
            fractions.append(stats.retained_fraction)
            held.append(stats.bytes_held)
            full.append(stats.bytes_full)
    row.perplexity = math.exp(nll / count)
    row.retained_fraction = sum(fractions) / len(fractions)
    row.kv_bytes = sum(held) / len(held)
    row.kv_bytes_full = sum(full) / len(full)
    seen = stats.tokens_seen
    row.retained_by_head = [[sum(layer[b][h] / seen[b] for b in range(len(seen))) / len(seen)
                             for h in range(len(layer[0]))] for layer in stats.retained_tokens]


@torch.inference_mode()
def run_generation(model, tok, cases: list[dict], new_tokens: int, cfg: cormlm.CacheConfig, batch: int = 8
                   ) -> list[str]:
    texts = []
    for start in range(0, len(cases), batch):
        chunk = cases[start: start + batch]
        out = cormlm.generate(model, [c["ids"] for c in chunk], max_new_tokens=new_tokens, cache=cfg, eos_token_id=[])
        texts += [tok.decode(ids, skip_special_tokens=True) for ids in out.new_tokens]
    return texts


def evaluate(model, tok, data: dict, sizes: Sizes, context: int, policy: str, params: dict, tasks,
             matched_to: str = "") -> Row:
    row = Row(context, policy, params, matched_to)
    cfg = cormlm.CacheConfig(policy, **params)
    started = time.perf_counter()
    if "perplexity" in tasks:
        run_perplexity(model, data["windows"], sizes.scored, cfg, row)
    if "passkey" in tasks:
        chunked = cormlm.CacheConfig(policy, prefill_chunk=sizes.prefill_chunk, **params)
        answers = run_generation(model, tok, data["passkey"], ANSWER_TOKENS, chunked)
        row.passkey = sum(first_number(a) == c["key"] for a, c in zip(answers, data["passkey"])) / len(answers)
        row.answers += [{"task": "passkey", "key": c["key"], "answer": a} for a, c in zip(answers, data["passkey"])]
    if "lines" in tasks and data["lines"]:
        answers = [first_line(a) for a in run_generation(model, tok, data["lines"], 32, cfg)]
        row.edit_similarity = sum(edit_similarity(a, s["target"]) for a, s in zip(answers, data["lines"])) / len(answers)
        row.exact_match = sum(a == s["target"] for a, s in zip(answers, data["lines"])) / len(answers)
        row.answers += [{"task": "lines", "file": s["file"], "line": s["line"], "target": s["target"], "answer": a}
                        for a, s in zip(answers, data["lines"])]
    row.seconds = time.perf_counter() - started
    print(f"  {context:>5} {row.label():<44} retained {row.retained_fraction:6.1%}  ppl {row.perplexity:7.4f}  "
          f"passkey {row.passkey:4.2f}  lines {row.edit_similarity:5.3f}  ({row.seconds:.0f} s)", flush=True)
    return row


# ------------------------------------------------------------------------------ output
def markdown_table(rows: list[Row]) -> str:
    out = []
    for context in sorted({r.context for r in rows}):
        here = [r for r in rows if r.context == context]
        full = next((r for r in here if r.policy == "full"), None)
        out += [f"\n#### {context}-token context\n",
                "| policy | params | at the memory of | mean retained | KV held (of full) | perplexity | vs full | "
                "passkey | next-line edit sim | s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in here:
            params = ", ".join(f"{k}={v}" for k, v in r.params.items()) or "-"
            loss = f"{100 * (r.perplexity / full.perplexity - 1):+.2f}%" if full and full.perplexity == full.perplexity \
                else "-"
            out.append(f"| {r.policy} | {params} | {r.matched_to or '-'} | {r.retained_fraction:.1%} | "
                       f"{r.kv_bytes / 2**20:.1f} MiB ({r.kv_bytes / max(r.kv_bytes_full, 1):.0%}) | "
                       f"{r.perplexity:.4f} | {loss} | {r.passkey:.2f} | {r.edit_similarity:.3f} | {r.seconds:.0f} |")
    return "\n".join(out) + "\n"


def plots(rows: list[Row], out: Path, title: str, tasks) -> list[Path]:
    """Quality against KV bytes kept (a column per context), and CORM's retained fraction
    per layer and KV head (its raggedness)."""
    import matplotlib.pyplot as plt

    contexts = sorted({r.context for r in rows})
    metrics = [(m, label) for m, label in (("perplexity", "perplexity (lower is better)"),
                                           ("passkey", "pass-key accuracy"),
                                           ("edit_similarity", "next-line edit similarity")) if
               {"edit_similarity": "lines"}.get(m, m) in tasks]
    fig, axes = plt.subplots(len(metrics), len(contexts), figsize=(5.5 * len(contexts), 3.8 * len(metrics)),
                             layout="constrained", squeeze=False)
    for col, context in enumerate(contexts):
        here = [r for r in rows if r.context == context]
        for i, (metric, label) in enumerate(metrics):
            ax = axes[i][col]
            for policy, marker in zip(("full", "corm", *BASELINES), "o*sD^v"):
                points = sorted((100 * r.kv_bytes / max(r.kv_bytes_full, 1), getattr(r, metric))
                                for r in here if r.policy == policy)
                if points:
                    ax.plot(*zip(*points), marker=marker, linestyle="-" if policy != "corm" else ":", label=policy)
            ax.set(title=f"{context} tokens", xlabel="KV bytes held (% of a full cache)", ylabel=label)
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    paths = [save_figure(fig, out / "quality_vs_kv_bytes.png")]

    corm = [r for r in rows if r.policy == "corm" and r.retained_by_head]
    if corm:
        fig, axes = plt.subplots(1, len(corm), figsize=(2.6 * len(corm) + 1, 6), layout="constrained", squeeze=False)
        for ax, r in zip(axes[0], corm):
            image = ax.imshow(r.retained_by_head, aspect="auto", vmin=0, vmax=1, cmap="viridis")
            ax.set(title="\n".join([f"{r.context} tokens", *(f"{k}={v}" for k, v in r.params.items())]), xlabel="KV head",
                   ylabel="layer")
        fig.colorbar(image, ax=axes[0].tolist(), label="keys retained (fraction of tokens seen)")
        paths.append(save_figure(fig, out / "corm_retained_by_head.png"))
    return paths


def merge_results(files: list[Path], out: Path) -> None:
    """One table, one JSON and one set of plots from several runs' results.json."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    rows = [Row(**row) for run in runs for row in run["rows"]]
    tasks = sorted({task for run in runs for task in run["tasks"]}, key=TASKS.index)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    header = "\n".join(f"- `{run.get('command', 'python scripts/evaluate.py')}`: contexts {run['sizes']['contexts']}, "
                       f"{run['minutes']:.1f} min" for run in runs)
    (out / "results.md").write_text(f"Merged from {len(runs)} runs:\n{header}\n{table}")
    (out / "results.json").write_text(json.dumps({"runs": [{k: v for k, v in run.items() if k != "rows"}
                                                           for run in runs], "tasks": tasks,
                                                  "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    plots(rows, out, f"{Path(str(runs[0]['model'])).name}: held-out standard-library code", tasks)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=REAL_MODEL,
                        help="smollm2 (the real model, default), weights (the embedded toy), a folder or a .gguf")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "eval")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths in tokens")
    parser.add_argument("--corm", nargs="+", default=None, help='CORM settings, e.g. "window=256,recent=256" '
                        '"window=1024,recent=64,budget=0.5"; each is followed by the baselines at its memory')
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, default=BASELINES,
                        help="baselines run at each CORM setting's memory (none: only full and CORM)")
    parser.add_argument("--extra", nargs="+", default=[], metavar="POLICY:SETTING",
                        help='more rows after full, e.g. "h2o:budget=0.5" "streaming:budget=0.5"')
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                        help="default: perplexity and passkey (lines too with --quick)")
    parser.add_argument("--windows", type=int, default=None, help="perplexity windows per context")
    parser.add_argument("--passkey-cases", type=int, default=None, help="pass-key prompts per context")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="RESULTS",
                        help="run nothing: merge these results.json files (e.g. one per context, run in parallel) "
                             "into one table and one set of plots in --out")
    args = parser.parse_args()
    sizes = QUICK if args.quick else DEFAULT
    sizes = Sizes(**{**asdict(sizes), **{k: v for k, v in (("contexts", args.contexts), ("corm", args.corm),
                                                          ("windows", args.windows),
                                                          ("passkey_cases", args.passkey_cases)) if v}})
    if args.from_json:
        merge_results(args.from_json, args.out)
        return
    tasks = args.tasks or (TASKS if args.quick else ("perplexity", "passkey"))
    for setting in sizes.corm:  # bad settings fail before anything loads or runs
        cormlm.CacheConfig("corm", **parse_setting(setting))
    started = time.perf_counter()

    print(f"loading {args.model}", flush=True)
    source = resolve_model_argument(args.model)
    model = cormlm.load_model(source, dtype=torch.float32)
    tok = cormlm.load_tokenizer(source)
    too_long = [c for c in sizes.contexts if c > model.config.context_length]
    if too_long:
        raise SystemExit(f"evaluate: error: contexts {too_long} exceed the model's {model.config.context_length}")
    shortest = sizes.scored + sizes.passkey_depth + 64  # prefix, key line and question need room too
    too_short = [c for c in sizes.contexts if c < shortest]
    if too_short:
        raise SystemExit(f"evaluate: error: contexts {too_short} are too short for {sizes.scored} scored tokens and a "
                         f"pass key {sizes.passkey_depth} tokens back; give at least {shortest}")
    texts = held_out_texts(args.stdlib)
    stream = token_stream(tok, texts)
    lines = line_samples(tok, texts, sizes.lines) if "lines" in tasks else []
    print(f"data: {len(texts)} held-out files, {len(stream)} tokens; per context: perplexity on {sizes.windows} "
          f"windows (last {sizes.scored} tokens decoded and scored), pass key on {sizes.passkey_cases} prompts "
          f"({sizes.passkey_depth} tokens from key to question, prefilled in chunks of {sizes.prefill_chunk})"
          + (f", next line on {len(lines)} samples" if lines else ""), flush=True)

    rows: list[Row] = []
    command = " ".join(["python scripts/evaluate.py", *map(shlex.quote, sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)

    def save(rows: list[Row]) -> None:  # after every row: a run stopped early keeps what it measured
        (args.out / "results.json").write_text(json.dumps(
            {"model": args.model, "command": command, "sizes": asdict(sizes), "tasks": list(tasks),
             "minutes": round((time.perf_counter() - started) / 60, 2), "threads": torch.get_num_threads(),
             "rows": [asdict(r) for r in rows]}, indent=1) + "\n")

    for context in sizes.contexts:
        data = {"windows": perplexity_windows(tok, stream, context, sizes.windows),
                "passkey": passkey_prompts(tok, stream, context, sizes), "lines": lines}
        rows.append(evaluate(model, tok, data, sizes, context, "full", {}, tasks))
        save(rows)
        for extra in args.extra:
            policy, _, setting = extra.partition(":")
            rows.append(evaluate(model, tok, data, sizes, context, policy, parse_setting(setting), tasks))
            save(rows)
        for setting in sizes.corm:
            corm = evaluate(model, tok, data, sizes, context, "corm", parse_setting(setting), tasks)
            rows.append(corm)
            save(rows)
            budget = round(corm.retained_fraction, 3)
            for policy in args.baselines:
                rows.append(evaluate(model, tok, data, sizes, context, policy, {"budget": budget}, tasks,
                                     matched_to=f"corm {setting}"))
                save(rows)

    minutes = (time.perf_counter() - started) / 60
    title = f"{Path(str(source)).name}: held-out standard-library code"
    table = markdown_table(rows)
    (args.out / "results.md").write_text(
        f"Command: `{command}` with contexts {sizes.contexts}, CORM settings {sizes.corm} ({minutes:.1f} min, "
        f"{torch.get_num_threads()} threads)\n{table}")
    save(rows)
    pngs = plots(rows, args.out, title, tasks)
    print(table)
    print(f"done in {minutes:.1f} min: {args.out / 'results.md'}, {args.out / 'results.json'}, "
          f"{', '.join(str(p) for p in pngs)}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except cormlm.CormlmError as exc:  # a missing or broken --model: one line, not a traceback
        raise SystemExit(f"evaluate: error: {exc}") from None
