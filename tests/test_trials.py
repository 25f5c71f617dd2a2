"""The in-place trial rule both measured choices share (linear kernels, decode-attention paths)."""

from cormlm.trials import TRIALS, decided, next_trial


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


def test_another_than_the_baseline_must_beat_it_by_the_margin():
    assert decided(["base", "x"], _times(base=1.0, x=0.95), baseline="base", margin=0.9) == "base"
    assert decided(["base", "x"], _times(base=1.0, x=0.8), baseline="base", margin=0.9) == "x"
    assert decided(["base", "x"], _times(base=1.0, x=0.95)) == "x"  # no baseline: the fastest


def test_trials_rotate_over_the_least_run_first_in_order():
    times: dict[str, list[float]] = {}
    order = []
    for _ in range(6):
        name = next_trial(["a", "b", "c"], times)
        order.append(name)
        times.setdefault(name, []).append(1.0)
    assert order == ["a", "b", "c", "a", "b", "c"]
