"""GQA and CORM together: what the union over a query group buys against the usual recipes.

    python scripts/gqa_experiment.py            # sizes of scripts/evaluate.py at 2048 tokens
    python scripts/gqa_experiment.py --quick

On the embedded GQA model (8 query heads, 2 KV heads), the same held-out perplexity and
next-line completion runs as scripts/evaluate.py, for:

(a) MHA: the model rewritten with as many KV heads as query heads (each KV head's k/v
    projection repeated for its group: the outputs are identical, the cache is not): what
    an MHA model of this shape holds with a full cache;
(b) GQA, full cache;
(c) GQA + CORM, a key kept when any query head of its group needs it (cormlm's rule: one
    copy of K/V per KV head, the union of the group's opinions);
(d) CORM decided per query head on K/V expanded per query head (the MHA rewrite of (a)
    with CORM): what research code that repeats K/V before attention does.

KV bytes are measured from the cache's storage, as in evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from evaluate import DEFAULT, QUICK, Row, evaluate, held_out_texts, line_samples, perplexity_windows, token_stream
from safetensors.torch import load_file, save_file

import cormlm

ROOT = Path(__file__).resolve().parent.parent


def write_mha_copy(folder: Path, out: Path) -> Path:
    """The checkpoint with k_proj / v_proj rows repeated per query head (num_key_value_heads = heads)."""
    config = json.loads((folder / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    for name in list(weights):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w = weights[name].view(kv_heads, head_dim, -1)
            weights[name] = w.repeat_interleave(heads // kv_heads, dim=0).reshape(heads * head_dim, -1).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config["num_key_value_heads"] = heads
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (folder / extra).is_file():
            shutil.copy(folder / extra, out / extra)
    return out


def markdown(rows: list[tuple[str, Row]]) -> str:
    full_bytes = rows[0][1].kv_bytes
    lines = ["| setup | KV heads stored | mean retained | KV bytes (mean) | vs MHA full | perplexity | edit sim | "
             "exact match |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows:
        lines.append(f"| {label} | {r.params['kv_heads']} | {r.retained_fraction:.1%} | {r.kv_bytes / 2**20:.2f} MiB | "
                     f"{r.kv_bytes / full_bytes:.1%} | {r.perplexity:.3f} | {r.edit_similarity:.3f} | "
                     f"{r.exact_match:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "weights")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gqa")
    parser.add_argument("--window", type=int, default=None, help="CORM w (default: 128, quick 32)")
    parser.add_argument("--recent", type=int, default=None, help="CORM r (default: 64, quick 32)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = QUICK if args.quick else DEFAULT
    window = args.window or (32 if args.quick else 128)
    recent = args.recent or (32 if args.quick else 64)
    started = time.perf_counter()

    gqa = cormlm.load_model(args.model)
    tok = cormlm.load_tokenizer(args.model)
    heads, kv_heads = gqa.config.num_heads, gqa.config.num_kv_heads
    if heads == kv_heads:
        raise SystemExit(f"{args.model} is not a GQA model ({heads} query heads, {kv_heads} KV heads)")
    with tempfile.TemporaryDirectory() as tmp:
        mha = cormlm.load_model(write_mha_copy(args.model, Path(tmp) / "mha"))
    texts = held_out_texts(args.stdlib)
    context = min(sizes.contexts[0], gqa.config.context_length)
    data = {"windows": perplexity_windows(tok, token_stream(tok, texts), context, sizes.windows), "passkey": [],
            "lines": line_samples(tok, texts, sizes.lines)}
    print(f"{heads} query heads, {kv_heads} KV heads; {sizes.windows} windows of {context} tokens, "
          f"{len(data['lines'])} next-line completions; CORM w={window} r={recent}", flush=True)

    corm = {"window": window, "recent": recent}
    setups = [("(a) MHA, full cache", mha, "full", {}, heads),
              ("(b) GQA, full cache", gqa, "full", {}, kv_heads),
              ("(c) GQA + CORM, union over the group (cormlm)", gqa, "corm", corm, kv_heads),
              ("(d) CORM per query head, K/V expanded", mha, "corm", corm, heads)]
    rows: list[tuple[str, Row]] = []
    for label, model, policy, params, stored in setups:
        print(f"{label}:", flush=True)
        row = evaluate(model, tok, data, sizes, context, policy, params, ("perplexity", "lines"))
        row.params = {"kv_heads": stored, **params}
        rows.append((label, row))

    table = markdown(rows)
    minutes = (time.perf_counter() - started) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(f"Command: `python scripts/gqa_experiment.py{' --quick' if args.quick else ''}`"
                                         f" ({minutes:.1f} min)\n\n{table}")
    (args.out / "results.json").write_text(json.dumps(
        {"window": window, "recent": recent, "sizes": asdict(sizes),
         "rows": [{"setup": label, **asdict(r)} for label, r in rows]}, indent=1) + "\n")
    print("\n" + table + f"\ndone in {minutes:.1f} min: {args.out / 'results.md'}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except cormlm.CormlmError as exc:  # a missing or broken --model: one line, not a traceback
        raise SystemExit(f"gqa_experiment: error: {exc}") from None
