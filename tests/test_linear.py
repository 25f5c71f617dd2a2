"""The split decode GEMV must compute what F.linear computes, and be chosen by measurement, not by constants."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from cormlm.models import linear as linear_module
from cormlm.models.linear import MEASURED_MAX_ROWS, TRIALS, Linear, gemv_choices


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.setattr(linear_module, "_choices", {})
    monkeypatch.setattr(linear_module, "_trials", {})
    monkeypatch.delenv("CORMLM_GEMV", raising=False)


@pytest.mark.parametrize("kernel", ["split", "linear", None])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 1), (2, 2), (4, 1), (2, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_both_kernels_match_f_linear(monkeypatch, kernel, shape, bias):
    if kernel is not None:
        monkeypatch.setenv("CORMLM_GEMV", kernel)
    torch.manual_seed(0)
    layer = Linear(96, 250, bias=bias)
    x = torch.randn(*shape, 96)
    expected = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    for _ in range(2 * TRIALS + 3 if kernel is None else 1):  # measuring: every trial call is right too
        got = layer(x)
        assert got.shape == (*shape, 250)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def _slow_kernel(monkeypatch, slow: str) -> list[str]:
    """Make one kernel 2 ms slower than the other; returns the kernels run, in order."""
    ran: list[str] = []
    real_split, real_linear = linear_module.split_gemv, F.linear

    def split(x, w):
        ran.append("split")
        if slow == "split":
            time.sleep(0.002)
        return real_split(x, w)

    def linear(x, w, b=None):
        ran.append("linear")
        if slow == "linear":
            time.sleep(0.002)
        return real_linear(x, w, b)

    monkeypatch.setattr(linear_module, "split_gemv", split)
    monkeypatch.setattr(linear_module.F, "linear", linear)
    return ran


@pytest.mark.parametrize("slow", ["split", "linear"])
def test_kernels_alternate_in_place_then_the_faster_is_kept_per_shape(monkeypatch, slow):
    ran = _slow_kernel(monkeypatch, slow)
    layer, other_rows = Linear(16, 8), Linear(16, 8)
    for _ in range(2 * TRIALS + 1):  # trials, one call each: alternating, one untimed warm-up of each kernel
        layer(torch.randn(1, 1, 16))
    assert ran == ["linear", "split"] * TRIALS + ["linear"] and gemv_choices() == []
    ran.clear()
    layer(torch.randn(1, 1, 16))  # the last trial: now decided
    fast = "linear" if slow == "split" else "split"
    assert gemv_choices() == [f"8x16, 1 row, float32, {torch.get_num_threads()} threads: "
                              f"{'split GEMV' if fast == 'split' else 'F.linear'}"]
    ran.clear()
    for _ in range(3):
        layer(torch.randn(1, 1, 16))
        other_rows(torch.randn(1, 1, 16))  # another layer of the same shape shares the choice
    assert ran == [fast] * 6
    ran.clear()
    layer(torch.randn(1, 2, 16))  # two rows: a shape of its own, measured from scratch
    assert ran == ["linear"]


def test_products_outside_the_gemv_range_never_measure(monkeypatch):
    ran = _slow_kernel(monkeypatch, "split")
    Linear(16, 8)(torch.randn(1, MEASURED_MAX_ROWS + 1, 16))  # prefill-sized: F.linear
    Linear(16, 7)(torch.randn(1, 1, 16))  # odd output width cannot be halved
    assert ran == ["linear", "linear"] and linear_module._trials == {}


def test_forced_kernel_skips_measurement(monkeypatch):
    ran = _slow_kernel(monkeypatch, "split")
    monkeypatch.setenv("CORMLM_GEMV", "split")
    Linear(16, 8)(torch.randn(1, 1, 16))
    monkeypatch.setenv("CORMLM_GEMV", "linear")
    Linear(16, 8)(torch.randn(1, 1, 16))
    assert ran == ["split", "linear"] and linear_module._trials == {}


def test_state_dict_is_that_of_nn_linear():
    layer = Linear(8, 6, bias=True)
    plain = torch.nn.Linear(8, 6, bias=True)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(plain(x), layer(x))


@torch.inference_mode()
def test_compiled_linear_matches_f_linear_for_one_and_several_rows(monkeypatch):
    monkeypatch.setenv("CORMLM_GEMV", "split")  # eager would split; compiled graphs use F.linear
    torch.manual_seed(0)
    layer = Linear(48, 20, bias=True)
    compiled = torch.compile(layer, dynamic=True)
    for rows in (1, 3, MEASURED_MAX_ROWS, 17):
        x = torch.randn(1, rows, 48)
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
