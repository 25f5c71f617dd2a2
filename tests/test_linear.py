"""The split decode GEMV must compute what F.linear computes, and be chosen by measurement, not by constants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cormlm.models import linear as linear_module
from cormlm.models.linear import MEASURED_MAX_ROWS, Linear, gemv_choices


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.setattr(linear_module, "_choices", {})
    monkeypatch.delenv("CORMLM_GEMV", raising=False)


@pytest.mark.parametrize("kernel", ["split", "linear"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 1), (2, 2), (4, 1), (2, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_both_kernels_match_f_linear(monkeypatch, kernel, shape, bias):
    monkeypatch.setenv("CORMLM_GEMV", kernel)
    torch.manual_seed(0)
    layer = Linear(96, 250, bias=bias)
    x = torch.randn(*shape, 96)
    expected = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    got = layer(x)
    assert got.shape == (*shape, 250)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def _count_split_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = linear_module.split_gemv
    monkeypatch.setattr(linear_module, "split_gemv", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    return calls


@pytest.mark.parametrize("split_faster", [True, False])
def test_the_measured_kernel_is_used_and_measured_once_per_shape(monkeypatch, split_faster):
    measured = []
    monkeypatch.setattr(linear_module, "measure_split", lambda x, w: measured.append((x.shape[0], *w.shape))
                        or split_faster)
    calls = _count_split_calls(monkeypatch)
    layer = Linear(16, 8)
    for _ in range(3):
        layer(torch.randn(1, 1, 16))
        layer(torch.randn(2, 1, 16))
    assert measured == [(1, 8, 16), (2, 8, 16)]  # once per (shape, rows), then cached
    assert calls == ([1, 2, 1, 2, 1, 2] if split_faster else [])
    assert gemv_choices() == [f"8x16, {rows} row{'s' * (rows > 1)}, float32, {torch.get_num_threads()} threads: "
                              f"{'split GEMV' if split_faster else 'F.linear'}" for rows in (1, 2)]


def test_products_outside_the_gemv_range_never_measure(monkeypatch):
    monkeypatch.setattr(linear_module, "measure_split", lambda x, w: pytest.fail("measured"))
    calls = _count_split_calls(monkeypatch)
    Linear(16, 8)(torch.randn(1, MEASURED_MAX_ROWS + 1, 16))  # prefill-sized: F.linear
    Linear(16, 7)(torch.randn(1, 1, 16))  # odd output width cannot be halved
    assert calls == []


def test_forced_kernel_skips_measurement(monkeypatch):
    monkeypatch.setattr(linear_module, "measure_split", lambda x, w: pytest.fail("measured"))
    calls = _count_split_calls(monkeypatch)
    monkeypatch.setenv("CORMLM_GEMV", "split")
    Linear(16, 8)(torch.randn(1, 1, 16))
    monkeypatch.setenv("CORMLM_GEMV", "linear")
    Linear(16, 8)(torch.randn(1, 1, 16))
    assert calls == [1]


def test_measurement_answers_on_real_tensors():
    """The real timing runs and gives a verdict (which one depends on the machine)."""
    torch.manual_seed(0)
    assert linear_module.measure_split(torch.randn(1, 64), torch.randn(32, 64), pairs=1) in (True, False)


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
