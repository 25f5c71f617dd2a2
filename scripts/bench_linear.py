"""The linear layer's kernels alone: every kernel cormlm.models.linear can choose, on a model's
product shapes, with the weights streaming from memory as they do in a decode step.

    python scripts/bench_linear.py                          # SmolLM2-135M's shapes, 1 and 8 rows
    python scripts/bench_linear.py --rows 1 2 4 8 --layers 30

bench_decode.py times whole steps; this isolates the products, which are most of a decode
step's time. For each product shape (SmolLM2-135M's by default: the fused q/k/v, output,
gate/up and down projections, and the 49152 x 576 head) ``--layers`` distinct random float32
weights are made (one per layer, as in the model: a weight timed over and over sits in cache,
and a kernel that wins on a hot weight can lose on a cold one), and each timed round runs one
kernel over all of them in turn; the kernels' rounds alternate, so a machine whose speed
drifts slows all alike. Before timing, each kernel's output is checked against F.linear's.

Figures: median microseconds per product over ``--rounds`` rounds, the weight's bytes per
second, and the ratio to F.linear measured in the same run; the last column names the kernel
the library's own in-place trials would keep by those medians (:func:`cormlm.trials.decided`
rule, F.linear as the baseline). The header names the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from bench_decode import describe_machine

from cormlm.models import linear
from cormlm.trials import TRIALS, decided

SMOLLM2_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576))
COLUMNS = ("rows", "product", "kernel", "µs per product", "GB/s of weight", "vs F.linear", "kept")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="input rows per product (1 to 8)")
    parser.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SMOLLM2_SHAPES],
                        help="products as OUTxIN (default: SmolLM2-135M's)")
    parser.add_argument("--layers", type=int, default=30, help="distinct weights per shape, run in turn")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per kernel")
    args = parser.parse_args(argv)
    if any(not 1 <= n <= linear.ROWS_MAX for n in args.rows):
        parser.error(f"--rows must be between 1 and {linear.ROWS_MAX} (the few-row products a decode step makes)")
    if args.layers < 1 or args.rounds < TRIALS:
        parser.error(f"--layers must be at least 1 and --rounds at least {TRIALS} (the trials' own count)")
    try:
        args.shapes = [tuple(int(n) for n in shape.lower().split("x")) for shape in args.shapes]
    except ValueError:
        parser.error(f"--shapes takes OUTxIN, e.g. 576x576; got {args.shapes}")
    if any(len(shape) != 2 or min(shape) < 1 for shape in args.shapes):
        parser.error(f"--shapes takes OUTxIN with positive sizes, e.g. 576x576; got {args.shapes}")
    return args


def time_kernels(rows: int, out_features: int, in_features: int, layers: int, rounds: int
                 ) -> dict[str, list[float]]:
    """Seconds per product of every kernel that can run this shape, one entry per round."""
    # the largest product (the head) needs fewer copies to stream from memory
    copies = max(1, min(layers, (256 * 2**20) // (4 * out_features * in_features)))
    weights = [torch.randn(out_features, in_features) for _ in range(copies)]
    x = torch.randn(rows, in_features)
    names = linear.candidates(x, weights[0])
    for name in names:
        torch.testing.assert_close(linear.KERNELS[name](x, weights[0]), F.linear(x, weights[0]), rtol=1e-4, atol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds + 1):  # the first round warms up, untimed
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            kernel = linear.KERNELS[name]
            started = time.perf_counter()
            for w in weights:
                kernel(x, w)
            if round_index:
                times[name].append((time.perf_counter() - started) / len(weights))
    return times


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("# linear kernels: each kernel cormlm can choose, weights streaming from memory\n")
    for line in describe_machine("cpu"):
        print(f"- {line}")
    print(f"\n{args.layers} weights per shape (fewer for products over 256 MiB of them), float32, "
          f"{args.rounds} rounds, medians\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---:" if c not in ("product", "kernel", "kept") else "---" for c in COLUMNS) + "|")
    summary = []
    with torch.inference_mode():
        for rows in args.rows:
            for out_features, in_features in args.shapes:
                times = time_kernels(rows, out_features, in_features, args.layers, args.rounds)
                median = {name: statistics.median(values) for name, values in times.items()}
                # the trials' rule needs a warm-up entry first: the medians leave it out
                kept = decided(list(times), {name: [0.0, *values] for name, values in times.items()},
                               baseline="linear", margin=linear.MARGIN)
                for name, seconds in median.items():
                    print(f"| {rows} | {out_features}x{in_features} | {linear.NAMES[name]} | {seconds * 1e6:.1f} | "
                          f"{out_features * in_features * 4 / seconds / 1e9:.1f} | {median['linear'] / seconds:.2f}x | "
                          f"{'yes' if name == kept else ''} |")
                summary.append(f"{rows} row{'s' * (rows > 1)}, {out_features}x{in_features}: {linear.NAMES[kept]} "
                               f"({median['linear'] / median[kept]:.2f}x F.linear)")
    print("\nKept by the trials' rule:")
    for line in summary:
        print(f"- {line}")


if __name__ == "__main__":
    main()
