"""What CORM buys on a model with learned attention, beside the baselines, at equal memory.

    python scripts/evaluate.py                 # the real model, SmolLM2-135M-Instruct (GGUF)
    python scripts/evaluate.py --model weights # the embedded toy (<= 30 min on a 2-core CPU)
    python scripts/evaluate.py --quick         # small sizes, fewer policies

Data: the held-out files of the embedded model's training split (scripts/train_tiny.py;
never trained on), minus ``encodings/`` (generated codec tables), those of >= 2048 tokens.

1. Perplexity with the cache in the loop: each 2048-token window is prefilled for its
   first ``--prefix`` tokens (the policy evicts), then the rest is fed one token at a
   time through the decoding path (evicting every step); every token after the prefix
   counts. Retained fraction and bytes held are sampled every 64 steps and averaged.
2. Next-line completion (LongBench's LCC task on our data): after >= ``--context`` tokens
   of a file, greedy generation; the first line generated is scored against the file's
   next line (both stripped) by edit similarity (2 x LCS / total length, fuzz.ratio's
   measure) and exact match.

Policies: full; corm at several (w, r); each baseline (streaming, h2o, scissorhands,
knorm) with its budget set to the mean retained fraction corm measured, one set per
corm setting, so rows compare at equal memory. Writes results.md, results.json and two
PNG plots (perplexity and edit similarity against retained fraction) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from train_tiny import is_held_out, stdlib_files

import cormlm
from cormlm.checkpoint.real_model import REAL_MODEL, resolve_model_argument

ROOT = Path(__file__).resolve().parent.parent

BASELINES = ("streaming", "h2o", "scissorhands", "knorm")
SAMPLE_EVERY = 64  # decode steps between cache-stat samples


@dataclass
class Sizes:
    window: int  # tokens per perplexity window
    prefix: int  # of which prefilled
    context: int  # completion context tokens (at least)
    lines_per_file: int
    new_tokens: int  # generated per completion
    corm: list[tuple[int, int]]  # (w, r) settings


DEFAULT = Sizes(window=2048, prefix=1024, context=1500, lines_per_file=4, new_tokens=32,
                corm=[(256, 256), (128, 64), (32, 32)])
QUICK = Sizes(window=384, prefix=192, context=256, lines_per_file=2, new_tokens=16, corm=[(32, 32)])


@dataclass
class Row:
    policy: str
    params: dict
    retained_fraction: float = 0.0
    kv_bytes: float = 0.0  # mean bytes held during the perplexity run
    kv_bytes_full: float = 0.0  # what a full cache held at the same moments
    perplexity: float = 0.0
    edit_similarity: float = 0.0
    exact_match: float = 0.0
    seconds: float = 0.0
    completions: list[dict] = field(default_factory=list)

    def label(self) -> str:
        return self.policy + (" " + " ".join(f"{k}={v}" for k, v in self.params.items()) if self.params else "")


# ------------------------------------------------------------------------------ data
def held_out_texts(stdlib: Path) -> list[tuple[str, str]]:
    texts = []
    for path in stdlib_files(stdlib):
        rel = path.relative_to(stdlib).as_posix()
        if is_held_out(rel) and not rel.startswith("encodings/"):
            texts.append((rel, path.read_text(encoding="utf-8")))
    return texts


def perplexity_windows(tok, texts, sizes: Sizes, limit: int | None) -> torch.Tensor:
    """Consecutive windows of ``sizes.window`` tokens (BOS first) from every long file."""
    rows = []
    for _, text in texts:
        ids = tok.encode(text)
        rows += [ids[i: i + sizes.window] for i in range(0, len(ids) - sizes.window + 1, sizes.window)]
    rows = rows[:limit] if limit else rows
    if not rows:
        raise SystemExit(f"no held-out file has {sizes.window} tokens: nothing to evaluate")
    return torch.tensor(rows)


def completion_samples(tok, texts, sizes: Sizes, limit: int | None) -> list[dict]:
    """Next-line targets after >= ``sizes.context`` tokens, evenly spread over each file."""
    samples = []
    for name, text in texts:
        lines = text.split("\n")
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line) + 1)
        candidates = []
        for i in range(1, len(lines)):
            target = lines[i].strip()
            if len(target) < 8 or target.startswith("#"):
                continue
            candidates.append(i)
        # need the context length in tokens: check from the end of the candidate list
        usable = [i for i in candidates if starts[i] > 4 * sizes.context]  # cheap pre-filter (>= ~1 char/token)
        picked = []
        for i in (usable[round(k * (len(usable) - 1) / max(sizes.lines_per_file - 1, 1))]
                  for k in range(sizes.lines_per_file)) if usable else []:
            prefix_ids = tok.encode(text[: starts[i] - 1], add_special_tokens=False)
            if len(prefix_ids) >= sizes.context and i not in picked:
                picked.append(i)
                context = [tok.bos_token_id, *prefix_ids[-sizes.context:]]
                samples.append({"file": name, "line": i + 1, "target": lines[i].strip(), "ids": context})
    samples = samples[:limit] if limit else samples
    if not samples:
        raise SystemExit(f"no held-out line has {sizes.context} tokens of context: nothing to evaluate")
    return samples


# ------------------------------------------------------------------------------ metrics
def edit_similarity(a: str, b: str) -> float:
    """2 x LCS(a, b) / (len a + len b), 1.0 for equal strings: rapidfuzz's normalised Indel
    similarity (``fuzz.ratio`` / 100), LongBench's code-completion measure."""
    from rapidfuzz import fuzz

    return fuzz.ratio(a, b) / 100


def first_line(generated: str) -> str:
    return generated.lstrip("\n").split("\n")[0].strip()


@torch.inference_mode()
def run_perplexity(model, windows: torch.Tensor, prefix: int, cfg: cormlm.CacheConfig, row: Row) -> None:
    cache = cormlm.make_cache(model, cfg, batch_size=windows.shape[0])
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


@torch.inference_mode()
def run_completion(model, tok, samples: list[dict], new_tokens: int, cfg: cormlm.CacheConfig, row: Row,
                   batch: int = 16) -> None:
    sims, exact = [], []
    for start in range(0, len(samples), batch):
        chunk = samples[start: start + batch]
        out = cormlm.generate(model, [s["ids"] for s in chunk], max_new_tokens=new_tokens, cache=cfg,
                              eos_token_id=[])
        for sample, ids in zip(chunk, out.new_tokens):
            predicted = first_line(tok.decode(ids, skip_special_tokens=True))
            sims.append(edit_similarity(predicted, sample["target"]))
            exact.append(float(predicted == sample["target"]))
            row.completions.append({"file": sample["file"], "line": sample["line"], "target": sample["target"],
                                    "predicted": predicted})
    row.edit_similarity = sum(sims) / len(sims)
    row.exact_match = sum(exact) / len(exact)


def evaluate(model, tok, windows, samples, sizes: Sizes, policy: str, params: dict) -> Row:
    row = Row(policy, params)
    cfg = cormlm.CacheConfig(policy, **params)
    started = time.perf_counter()
    run_perplexity(model, windows, sizes.prefix, cfg, row)
    run_completion(model, tok, samples, sizes.new_tokens, cfg, row)
    row.seconds = time.perf_counter() - started
    print(f"  {row.label():<42} retained {row.retained_fraction:6.1%}  ppl {row.perplexity:7.3f}  "
          f"edit sim {row.edit_similarity:.3f}  exact {row.exact_match:.3f}  ({row.seconds:.0f} s)", flush=True)
    return row


# ------------------------------------------------------------------------------ output
def markdown_table(rows: list[Row]) -> str:
    lines = ["| policy | params | mean retained | KV bytes (mean) | perplexity | edit sim | exact match |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r.params.items()) or "-"
        lines.append(f"| {r.policy} | {params} | {r.retained_fraction:.1%} | {r.kv_bytes / 2**20:.2f} MiB "
                     f"({r.kv_bytes / r.kv_bytes_full:.0%}) | {r.perplexity:.3f} | {r.edit_similarity:.3f} | "
                     f"{r.exact_match:.3f} |")
    return "\n".join(lines) + "\n"


def plots(rows: list[Row], out: Path, title: str) -> list[Path]:
    """Quality against retained KV fraction, one line per policy (matplotlib: the eval extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric, label in (("perplexity", "perplexity (lower is better)"),
                          ("edit_similarity", "next-line edit similarity (higher is better)")):
        fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
        for policy, marker in zip(("full", "corm", *BASELINES), "o*sD^v"):
            points = sorted((r.retained_fraction, getattr(r, metric)) for r in rows if r.policy == policy)
            if points:
                ax.plot([100 * x for x, _ in points], [y for _, y in points], marker=marker, label=policy)
        ax.set(title=title, xlabel="mean retained KV fraction (%)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
        path = out / f"{metric}_vs_retained.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=REAL_MODEL,
                        help="smollm2 (the real model, default), weights (the embedded toy), a folder or a .gguf")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "eval")
    parser.add_argument("--quick", action="store_true", help="small sizes and one corm setting (~1 minute)")
    parser.add_argument("--max-windows", type=int, default=None, help="cap the perplexity windows")
    parser.add_argument("--max-samples", type=int, default=None, help="cap the completion samples")
    args = parser.parse_args()
    sizes = QUICK if args.quick else DEFAULT
    max_windows = args.max_windows or (3 if args.quick else None)
    max_samples = args.max_samples or (6 if args.quick else None)
    started = time.perf_counter()

    print(f"loading {args.model}", flush=True)
    source = resolve_model_argument(args.model)
    model = cormlm.load_model(source)
    tok = cormlm.load_tokenizer(source)
    texts = held_out_texts(args.stdlib)
    windows = perplexity_windows(tok, texts, sizes, max_windows)
    samples = completion_samples(tok, texts, sizes, max_samples)
    print(f"data: {len(texts)} held-out files; perplexity on {windows.shape[0]} windows of {sizes.window} tokens "
          f"({sizes.prefix} prefilled, {sizes.window - sizes.prefix} decoded); next-line completion on "
          f"{len(samples)} lines after {sizes.context} tokens", flush=True)

    rows = [evaluate(model, tok, windows, samples, sizes, "full", {})]
    for window, recent in sizes.corm:
        corm = evaluate(model, tok, windows, samples, sizes, "corm", {"window": window, "recent": recent})
        rows.append(corm)
        budget = round(corm.retained_fraction, 3)
        for policy in BASELINES:
            rows.append(evaluate(model, tok, windows, samples, sizes, policy, {"budget": budget}))

    args.out.mkdir(parents=True, exist_ok=True)
    minutes = (time.perf_counter() - started) / 60
    title = f"{Path(source).name}: {windows.shape[0]} x {sizes.window}-token held-out windows"
    table = markdown_table(rows)
    (args.out / "results.md").write_text(
        f"Command: `python scripts/evaluate.py{' --quick' if args.quick else ''}` ({minutes:.1f} min, "
        f"{torch.get_num_threads()} threads)\n\n{table}")
    (args.out / "results.json").write_text(json.dumps(
        {"model": args.model, "sizes": asdict(sizes), "windows": windows.shape[0], "completion_samples": len(samples),
         "minutes": round(minutes, 2), "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    pngs = plots(rows, args.out, title)
    print("\n" + table)
    print(f"done in {minutes:.1f} min: {args.out / 'results.md'}, {args.out / 'results.json'}, "
          f"{', '.join(str(p) for p in pngs)}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except cormlm.CormlmError as exc:  # a missing or broken --model: one line, not a traceback
        raise SystemExit(f"evaluate: error: {exc}") from None
