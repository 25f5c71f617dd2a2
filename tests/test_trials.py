"""The in-place trial rule both measured choices share (linear kernels, decode-attention paths)."""

from cormlm.trials import TRIALS, decided, next_trial, pick, power_of_two, record, status


def _times(**medians: float) -> dict[str, list[float]]:
    """TRIALS + 1 calls of each: a slow warm-up call first, then its steady time."""
    return {name: [100.0] + [value] * TRIALS for name, value in medians.items()}


def test_nothing_is_decided_before_every_name_ran_its_trials():
    times = _times(a=1.0, b=2.0)
    times["b"].pop()
    assert decided(["a", "b"], times) is None
    times["b"].append(2.0)
    assert decided(["a", "b"], times) == "a"


def test_the_warm_up_call_is_left_out_and_the_median_decides():
    half = TRIALS // 2
    # a's timed calls have median 2.0, b's 2.5; counted, a's slow warm-up would lift a's to 3.0
    times = {"a": [100.0] + [1.0] * half + [3.0] * (TRIALS - half), "b": [0.0] + [2.5] * TRIALS}
    assert decided(["a", "b"], times) == "a"
    times["a"] = [100.0] + [1.0] * (TRIALS - 1) + [30.0]  # one slow outlier: a's median 1.0, its mean 4.6
    assert decided(["a", "b"], times) == "a"


def _spread(centre: float, half_width: float) -> list[float]:
    """A warm-up call, then TRIALS timed calls spread evenly over centre +- half_width."""
    step = 2 * half_width / (TRIALS - 1)
    return [100.0] + [centre - half_width + i * step for i in range(TRIALS)]


def test_another_than_the_baseline_must_beat_it_by_the_margin_or_beyond_the_trials_spread():
    # steady calls: 5% faster is faster, margin or not
    assert decided(["base", "x"], _times(base=1.0, x=0.95), baseline="base", margin=0.9) == "x"
    # the same medians in noisy calls: x's upper quartile (~1.02) is above base's lower one (~0.93)
    times = {"base": _spread(1.0, 0.1), "x": _spread(0.95, 0.1)}
    assert decided(["base", "x"], times, baseline="base") == "base"
    assert decided(["base", "x"], times, baseline="base", margin=0.9) == "base"
    # noisy but faster by more than the margin: taken
    times = {"base": _spread(1.0, 0.3), "x": _spread(0.8, 0.3)}
    assert decided(["base", "x"], times, baseline="base", margin=0.9) == "x"
    assert decided(["base", "x"], times, baseline="base") == "base"
    assert decided(["base", "x"], times) == "x"  # no baseline: the fastest median
    # the quartiles just apart, then just overlapping
    times = {"base": _spread(1.0, 0.1), "x": _spread(0.85, 0.05)}
    assert decided(["base", "x"], times, baseline="base") == "x"
    times = {"base": _spread(1.0, 0.1), "x": _spread(0.92, 0.08)}
    assert decided(["base", "x"], times, baseline="base") == "base"
    # the baseline fastest: kept, whatever the spread
    assert decided(["base", "x"], {"base": _spread(1.0, 0.3), "x": _spread(1.5, 0.0)}, baseline="base") == "base"


def test_trials_rotate_over_the_least_run_first_in_order():
    times: dict[str, list[float]] = {}
    order = []
    for _ in range(6):
        name = next_trial(["a", "b", "c"], times)
        order.append(name)
        times.setdefault(name, []).append(1.0)
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_sizes_are_keyed_by_the_next_power_of_two():
    assert [power_of_two(n) for n in (0, 1, 2, 3, 4, 5, 64, 65, 4096)] == [1, 1, 2, 4, 4, 8, 64, 128, 4096]


def test_the_status_lists_kept_choices_and_the_trials_still_running():
    trials = {"k1": {"a": [1.0] * 3, "b": [1.0] * 2}}
    assert status(trials, {"k2": "b"}, ["a", "b"]) == {"k1": f"still measuring (5 of {2 * (TRIALS + 1)} calls)",
                                                        "k2": "b"}


def test_pick_rotates_the_trials_then_keeps_the_choice():
    choices, trials = {}, {}
    picked = []
    for _ in range(2 * (TRIALS + 1)):
        name, trial = pick("k", ("a", "b"), choices, trials)
        assert trial
        picked.append(name)
        record(trials, choices, "k", ("a", "b"), name, 1.0 if name == "b" else 2.0)
    assert picked.count("a") == picked.count("b") == TRIALS + 1 and picked[:2] == ["a", "b"]
    assert pick("k", ("a", "b"), choices, trials) == ("b", False) and trials == {}
