"""In-place trials between interchangeable implementations of one computation.

The first calls of each key (a shape, a dtype, a thread count) rotate over the
implementations that can run it and are timed where they run, inside the model's own steps;
once each has run ``TRIALS`` timed calls after one untimed warm-up call, the fastest is kept.
The linear layer's kernels (:mod:`cormlm.models.linear`) and the decode-attention paths
(:mod:`cormlm.cache.paged_kernel`) are chosen this way.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence

from .errors import InputError

TRIALS = 8  # timed calls of each implementation per key (after one untimed warm-up call each)


def power_of_two(n: int) -> int:
    """``n`` rounded up to a power of two: how sizes are keyed (a growing pool or prompt is
    not measured again at every size)."""
    return 1 << max(n - 1, 0).bit_length()


def status(trials: dict[object, dict[str, list[float]]], choices: dict[object, str],
           names: Sequence[str]) -> dict[object, str]:
    """Each key's kept choice, or 'still measuring (k of n calls)' while its trials run: what
    the modules' ``kernel_status`` lists."""
    total = len(names) * (TRIALS + 1)
    return {**{key: f"still measuring ({sum(map(len, times.values()))} of {total} calls)"
               for key, times in trials.items()}, **choices}


def pick(key: object, names: Sequence[str], choices: dict[object, str],
         trials: dict[object, dict[str, list[float]]]) -> tuple[str, bool]:
    """``key``'s kept choice, or the next trial's implementation while it is measured, and
    whether the call is a trial (its time goes to :func:`record`)."""
    choice = choices.get(key)
    if choice is not None:
        return choice, False
    return next_trial(names, trials.setdefault(key, {})), True


def next_trial(names: Sequence[str], times: dict[str, list[float]]) -> str:
    """The implementation to run next for a key still measured: the one run least (the first
    of ``names`` among equals)."""
    return min(names, key=lambda name: len(times.get(name, ())))


def decided(names: Sequence[str], times: dict[str, list[float]], baseline: str | None = None,
            margin: float = 0.0) -> str | None:
    """The fastest of ``names`` once each has run its trials (None before): the median of
    each one's timed calls, the warm-up left out. Another than ``baseline`` only where it is
    clearly faster: its median below ``margin`` times the baseline's, or faster beyond the
    trials' own noise, three quarters of its calls faster than three quarters of the
    baseline's (its upper quartile below the baseline's lower quartile: a small but steady
    gain that the margin alone would leave unused). ``margin`` 0: by the spread alone."""
    if not all(len(times.get(name, ())) > TRIALS for name in names):
        return None
    median = {name: statistics.median(times[name][1:]) for name in names}
    best = min(median, key=median.get)
    if baseline is None or best == baseline or median[best] < margin * median[baseline]:
        return best
    steady = _quartiles(times[best][1:])[2] < _quartiles(times[baseline][1:])[0]
    return best if steady else baseline


def _quartiles(values: list[float]) -> list[float]:
    """Lower quartile, median and upper quartile of ``values``."""
    return statistics.quantiles(values, n=4, method="inclusive")


def record(trials: dict[object, dict[str, list[float]]], choices: dict[object, str], key: object,
           names: Sequence[str], name: str, seconds: float) -> None:
    """One trial call of ``name`` for ``key`` took ``seconds``; once every one of ``names``
    ran its trials, the fastest goes to ``choices`` and the key's times are dropped."""
    times = trials[key]
    times.setdefault(name, []).append(seconds)
    choice = decided(names, times)
    if choice is not None:
        choices[key] = choice
        del trials[key]


def forced(env: str, names: Sequence[str], what: str, measured: str) -> str | None:
    """The implementation the environment variable ``env`` forces (None where unset or
    blank); a value not among ``names`` is an error that names them (``what`` the value
    should be, ``measured`` what is measured when it is unset)."""
    value = os.environ.get(env, "").strip().lower()
    if not value:
        return None
    if value not in names:
        raise InputError(f"{env}={value!r} is not {what}; use one of {', '.join(names)} (or unset it to let "
                         f"{measured} be measured)")
    return value
