"""CORM's premise on a real model (the paper's Figure 3): recent queries resemble each other and
agree on which keys matter.

    python scripts/query_similarity.py            # SmolLM2-135M-Instruct, 4 texts x 2048 tokens
    python scripts/query_similarity.py --quick    # 1 text x 512 tokens

On held-out Python standard-library files (on every machine), per layer:

1. Query similarity by distance: mean cosine similarity of q_t and q_{t-d} over heads and t,
   before and after RoPE (attention sees the rotated ones).
2. Agreement on important keys (docs/corm.md: key i is important to query t iff
   a_t[i] >= 1/t, the union over a KV head's query group). For a memory of w queries and
   query t, the *old* keys are those every one of the last w queries could see; CORM would
   evict an old key none of them marked. Reported per w: the share of t's important old keys
   that the last w queries also marked (recall: CORM's premise says close to 1), and the
   attention mass t gives to old keys none of them marked (what evicting them costs t).
3. What the 1/t test calls unimportant: the share of keys a query finds important, and the
   attention mass it gives to keys below alpha/t (alpha = 1, 0.25, 0.1): mass that a
   rule built on the test may evict.

Writes query_similarity.json and query_similarity.png to ``--out`` (default docs/eval).
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch
from evaluate import held_out_texts
from plot_style import save_figure

import cormlm
from cormlm.checkpoint.real_model import REAL_MODEL, resolve_model_argument

ROOT = Path(__file__).resolve().parent.parent
DISTANCES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
WINDOWS = (1, 4, 16, 64, 256)
ALPHAS = (1.0, 0.25, 0.1)  # importance thresholds alpha / t
CORM_DEFAULT = 256  # w = r for the CORM / H2O comparison
COMPARISON = ("corm_lost", "h2o_lost", "corm_lost_age<512", "corm_lost_age512-1024", "corm_lost_age>=1024",
              "h2o_keeps_of_corm_evicted", "corm_kept", "sink_evicted")  # corm_against_h2o's fields, in order


def record_queries(model) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Patch every layer to keep its queries (before / after RoPE) and keys of the next forward."""
    raw, rotated, keys = {}, {}, {}
    for layer, block in enumerate(model.blocks):
        attn = block.attn

        def keep_raw(module, args, out, layer=layer, attn=attn):
            b, t, _ = out.shape
            raw[layer] = out[..., :attn.split_sizes[0]].view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)

        def keep_rotated(q, k, v, step, attend=attn.attend, layer=layer):
            rotated[layer], keys[layer] = q, k
            return attend(q, k, v, step)

        attn.qkv.register_forward_hook(keep_raw)
        attn.attend = keep_rotated
    return raw, rotated, keys


def cosine_by_distance(q: torch.Tensor, distances) -> list[float]:
    """Mean cos(q_t, q_{t-d}) over heads and t, for each d ([H, T, D] queries)."""
    unit = torch.nn.functional.normalize(q.double(), dim=-1)
    return [float((unit[:, d:] * unit[:, :-d]).sum(-1).mean()) if d < q.shape[1] else float("nan")
            for d in distances]


def full_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal probabilities [Hkv, G, T, T] (float64) and CORM's importance [Hkv, T, T] (a >= 1/t,
    union over the group) for queries ``q`` [Hq, T, D] and keys ``k`` [Hkv, T, D]."""
    hq, t, _ = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    scores = torch.einsum("gtd,gsd->gts", q.double().reshape(hkv, g * t, -1), k.double()).view(hkv, g, t, t) * scale
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    threshold = 1.0 / torch.arange(1, t + 1, dtype=torch.float64)
    return probs, (probs >= threshold[:, None]).any(dim=1)


def agreement(probs: torch.Tensor, important: torch.Tensor, windows, first: int, alphas=ALPHAS
              ) -> dict[str, list[float]]:
    """Recall of important old keys and attention mass lost, per window (see the module doc),
    from :func:`full_attention`'s output; queries from index ``first`` on are scored."""
    hkv, _, t, _ = probs.shape
    threshold = 1.0 / torch.arange(1, t + 1, dtype=torch.float64)
    counts = torch.cat([torch.zeros(hkv, 1, t, dtype=torch.int32), important.int().cumsum(dim=1)], dim=1)
    rows = torch.arange(first, t)
    key_index = torch.arange(t)
    recall, mass = [], []
    for w in windows:
        marked = (counts[:, rows] - counts[:, (rows - w).clamp(min=0)]) > 0  # [Hkv, R, T] by queries t-w..t-1
        old = key_index[None, :] <= (rows - w)[:, None]  # [R, T]: visible to each of the last w queries
        unmarked_old = old & ~marked
        mine = important[:, rows] & old
        recall.append(float(1 - (mine & unmarked_old).sum() / mine.sum().clamp(min=1)))
        mass.append(float((probs[:, :, rows] * unmarked_old[:, None]).sum(-1).mean()))
    scored = probs[:, :, rows]  # [Hkv, G, R, T]
    below = [float((scored * (scored < alpha * threshold[rows, None])).sum(-1).mean()) for alpha in alphas]
    share = float((important[:, rows].sum(-1) / (rows + 1)).double().mean())
    return {"recall": recall, "mass_lost": mass, "mass_below_alpha": below, "important_share": [share]}


def corm_against_h2o(probs: torch.Tensor, important: torch.Tensor, window: int, recent: int, rows: torch.Tensor
                     ) -> dict[str, float]:
    """What CORM's rule has evicted by query t, against H2O keeping as many keys, on one
    layer's full attention (no feedback of evictions into attention: an estimate).

    CORM: key i is gone for query t if at some earlier step t' >= w (1-indexed) it was
    unmarked by queries t'-w+1..t' and older than t' - r: the per-step rule (prefill
    decides once instead, which can only keep more). H2O: per KV head the same number of
    keys, the ``recent`` newest plus the highest attention summed over every earlier query.
    Returns the attention mass query t gives to each policy's evicted keys (mean over query
    heads and the scored ``rows``), CORM's lost mass by key age, the share of CORM's evicted
    keys H2O would keep, CORM's kept fraction, and how often CORM has evicted position 0.
    """
    hkv, g, t, _ = probs.shape
    counts = torch.cat([torch.zeros(hkv, 1, t, dtype=torch.int32), important.int().cumsum(dim=1)], dim=1)
    steps = torch.arange(t)  # 0-indexed query index of each step
    unmarked = (counts[:, 1:] - counts[:, (steps + 1 - window).clamp(min=0)]) == 0  # [Hkv, T, T]: window at t'
    eligible = (steps[:, None] + 1 >= window) & (torch.arange(t)[None, :] <= steps[:, None] - recent)
    gone = (unmarked & eligible).int().cummax(dim=1).values.bool()  # evicted at step t' or before
    accumulated = probs.sum(dim=1).cumsum(dim=1)  # [Hkv, T, T]: H2O's score after each step
    out = {"corm_lost": 0.0, "h2o_lost": 0.0, "corm_lost_age<512": 0.0, "corm_lost_age512-1024": 0.0,
           "corm_lost_age>=1024": 0.0, "h2o_keeps_of_corm_evicted": 0.0, "corm_kept": 0.0, "sink_evicted": 0.0}
    key_index = torch.arange(t)
    for row in rows.tolist():
        evicted = gone[:, row - 1, : row + 1]  # [Hkv, row+1]: evicted before query ``row`` attends
        p = probs[:, :, row, : row + 1]  # [Hkv, G, row+1]
        keep = (row + 1) - evicted.sum(-1)  # keys CORM holds, per KV head
        old = key_index[: row + 1] <= row - recent
        score = accumulated[:, row - 1, : row + 1].masked_fill(~old, float("inf"))  # recent: always kept
        rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)
        h2o_evicted = rank >= keep[:, None]
        age = row - key_index[: row + 1]
        out["corm_lost"] += float((p * evicted[:, None]).sum(-1).mean())
        out["h2o_lost"] += float((p * h2o_evicted[:, None]).sum(-1).mean())
        for name, band in (("corm_lost_age<512", age < 512), ("corm_lost_age512-1024", (age >= 512) & (age < 1024)),
                           ("corm_lost_age>=1024", age >= 1024)):
            out[name] += float((p * (evicted & band)[:, None]).sum(-1).mean())
        out["h2o_keeps_of_corm_evicted"] += float((evicted & ~h2o_evicted).sum() / evicted.sum().clamp(min=1))
        out["corm_kept"] += float(keep.double().mean() / (row + 1))
        out["sink_evicted"] += float(evicted[:, 0].double().mean())
    return {name: value / len(rows) for name, value in out.items()}


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    layers = len(results["layers"])
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8), layout="constrained")
    cmap = plt.get_cmap("viridis")
    for layer, row in enumerate(results["layers"]):
        axes[0].plot(DISTANCES, row["cosine_rotated"], color=cmap(layer / max(layers - 1, 1)), alpha=0.8)
    axes[0].set(xscale="log", xlabel="distance between queries (tokens)", ylabel="mean cosine similarity",
                title="query similarity after RoPE (a line per layer, dark = first)")
    axes[0].grid(alpha=0.3)
    for ax, key, label in ((axes[1], "recall", "share of t's important old keys\nthe last w queries also marked"),
                           (axes[2], "mass_lost", "attention mass t gives to old keys\nno recent query marked")):
        grid = [[row[key][i] for i in range(len(WINDOWS))] for row in results["layers"]]
        image = ax.imshow(grid, aspect="auto", cmap="magma" if key == "mass_lost" else "viridis")
        ax.set(xticks=range(len(WINDOWS)), xticklabels=WINDOWS, xlabel="w (queries remembered)", ylabel="layer",
               title=label)
        fig.colorbar(image, ax=ax)
    for i, alpha in enumerate(ALPHAS):
        axes[3].plot([row["mass_below_alpha"][i] for row in results["layers"]], marker=".", label=f"alpha = {alpha}")
    axes[3].set(xlabel="layer", ylabel="attention mass per query", title="mass on keys below alpha / t")
    axes[3].grid(alpha=0.3)
    axes[3].legend()
    fig.suptitle(title)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=REAL_MODEL, help="smollm2 (default), weights, a folder or a .gguf")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "eval")
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="one text of 512 tokens")
    args = parser.parse_args()
    texts, tokens = (1, 512) if args.quick else (args.texts, args.tokens)
    started = time.perf_counter()
    source = resolve_model_argument(args.model)
    print(f"loading {args.model}", flush=True)
    model = cormlm.load_model(source, dtype=torch.float32)
    tok = cormlm.load_tokenizer(source)
    raw, rotated, keys = record_queries(model)
    scale = model.blocks[0].attn.spec.scale
    first = min(max(WINDOWS), tokens // 2)
    sums: list[dict[str, list[float]]] = []
    used = []
    for name, text in held_out_texts(args.stdlib):
        ids = tok.encode(text)
        if len(ids) < tokens:
            continue
        used.append(name)
        with torch.inference_mode():
            model(torch.tensor([ids[:tokens]]))
        for layer in range(len(model.blocks)):
            probs, important = full_attention(rotated[layer][0], keys[layer][0], scale)
            row = {"cosine_raw": cosine_by_distance(raw[layer][0], DISTANCES),
                   "cosine_rotated": cosine_by_distance(rotated[layer][0], DISTANCES),
                   **agreement(probs, important, WINDOWS, first),
                   "corm_vs_h2o": list(corm_against_h2o(probs, important, CORM_DEFAULT, CORM_DEFAULT,
                                                        torch.arange(tokens - 256, tokens, 16)).values())}
            if len(sums) <= layer:
                sums.append({key: [0.0] * len(v) for key, v in row.items()})
            for key, values in row.items():
                sums[layer][key] = [a + b for a, b in zip(sums[layer][key], values)]
        print(f"  text {len(used)}/{texts}: {name} ({time.perf_counter() - started:.0f} s)", flush=True)
        if len(used) == texts:
            break
    if not used:
        raise SystemExit(f"no held-out file has {tokens} tokens")
    layers = [{key: [v / len(used) for v in values] for key, values in row.items()} for row in sums]
    results = {"model": args.model, "texts": used, "tokens": tokens, "distances": DISTANCES, "windows": WINDOWS,
               "alphas": ALPHAS, "corm_vs_h2o_fields": COMPARISON,
               "scored_from_query": first, "layers": layers, "seconds": round(time.perf_counter() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "query_similarity.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "query_similarity.png",
         f"{Path(str(source)).name}: {len(used)} x {tokens}-token held-out texts")
    print(f"\n{'layer':>5} {'cos d=1':>8} {'cos d=16':>9} {'cos d=256':>10} " +
          " ".join(f"{'recall w=' + str(w):>13}" for w in WINDOWS) + " " +
          " ".join(f"{'lost w=' + str(w):>11}" for w in WINDOWS) + f" {'important':>9} " +
          " ".join(f"{'below ' + str(a) + '/t':>11}" for a in ALPHAS))
    for i, row in enumerate(layers):
        cos = row["cosine_rotated"]
        print(f"{i:>5} {cos[0]:>8.3f} {cos[4]:>9.3f} {cos[8]:>10.3f} " +
              " ".join(f"{v:>13.3f}" for v in row["recall"]) + " " + " ".join(f"{v:>11.4f}" for v in row["mass_lost"])
              + f" {row['important_share'][0]:>9.3f} " + " ".join(f"{v:>11.3f}" for v in row["mass_below_alpha"]))
    mean = {key: [sum(r[key][i] for r in layers) / len(layers) for i in range(len(layers[0][key]))]
            for key in ("recall", "mass_lost", "mass_below_alpha", "important_share", "corm_vs_h2o")}
    print(f"\nCORM w = r = {CORM_DEFAULT} (per-step rule on full attention) against H2O keeping as many keys, "
          f"queries {tokens - 256}..{tokens - 1}:\n{'layer':>5} " + " ".join(f"{name:>14}" for name in COMPARISON))
    for i, row in enumerate(layers):
        print(f"{i:>5} " + " ".join(f"{v:>14.4f}" for v in row["corm_vs_h2o"]))
    print("  mean " + " ".join(f"{v:>14.4f}" for v in mean["corm_vs_h2o"]))
    print("mean over layers: recall " + ", ".join(f"w={w}: {v:.3f}" for w, v in zip(WINDOWS, mean["recall"])) +
          "; mass lost " + ", ".join(f"w={w}: {v:.4f}" for w, v in zip(WINDOWS, mean["mass_lost"])) +
          f"; keys important to a query {mean['important_share'][0]:.3f}; mass below alpha/t " +
          ", ".join(f"{a}: {v:.3f}" for a, v in zip(ALPHAS, mean["mass_below_alpha"])))
    results["mean"] = mean
    (args.out / "query_similarity.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"done in {results['seconds']:.0f} s: {args.out / 'query_similarity.json'}, "
          f"{args.out / 'query_similarity.png'}")


if __name__ == "__main__":
    main()
