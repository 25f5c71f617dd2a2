"""Helpers shared by the tests that hold cormlm's cache policies to a naive reference:
models loaded once, seeded prompts, the first prompt whose reference run is robust to
fp32 rounding, left padding, and kept positions compared with a readable first mismatch."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from corm_reference import reference_run

import cormlm

_MODELS: dict[Path, torch.nn.Module] = {}


def cached_model(folder: Path) -> torch.nn.Module:
    if folder not in _MODELS:
        _MODELS[folder] = cormlm.load_model(folder)
    return _MODELS[folder]


def random_prompt(length: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def first_robust(run_for: Callable[[list[int]], Any], length: int, seed: int, vocab: int,
                 what: str = "the checkpoint puts decisions too close to their thresholds") -> tuple[list[int], Any]:
    """(prompt, reference run) for the first of 40 seeds from ``seed`` whose run is robust."""
    for s in range(seed, seed + 40):
        prompt = random_prompt(length, 1000 * s + length, vocab)
        run = run_for(prompt)
        if run.robust():
            return prompt, run
    raise AssertionError(f"no robust prompt found: {what}")


@cache
def robust_corm_case(folder: Path, length: int, new: int, window: int, recent: int, vocab: int, seed: int = 0):
    """(prompt, CORM reference run) for the first seed from ``seed`` whose run is robust to fp32."""
    return first_robust(lambda prompt: reference_run(folder, prompt, new, window, recent), length, seed, vocab,
                        "the checkpoint puts attention too close to 1/t")


def kept_positions(cache, num_layers: int, row: int = 0) -> list[list[list[int]]]:
    return [[p.tolist() for p in cache.positions(layer)[row]] for layer in range(num_layers)]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def first_mismatch(got: list[list[list[int]]], want: list[list[list[int]]]) -> str:
    for layer, (g_layer, w_layer) in enumerate(zip(got, want)):
        if len(g_layer) != len(w_layer):
            return f"layer {layer}: {len(g_layer)} KV heads, reference {len(w_layer)}"
        for head, (g, w) in enumerate(zip(g_layer, w_layer)):
            if g != w:
                return (f"layer {layer} KV head {head}: cormlm-only {sorted(set(g) - set(w))}, "
                        f"reference-only {sorted(set(w) - set(g))}")
    return "shapes differ" if got != want else "none"
