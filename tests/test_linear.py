"""The split decode GEMV must compute what F.linear computes, and be used only where it pays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cormlm.models import linear as linear_module
from cormlm.models.linear import SPLIT_MAX_ROWS, SPLIT_MAX_ROWS_NARROW, SPLIT_NARROW_INPUT, Linear


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 1), (2, 2), (4, 1), (2, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_split_gemv_matches_f_linear(shape, bias):
    torch.manual_seed(0)
    layer = Linear(96, 250, bias=bias)
    x = torch.randn(*shape, 96)
    expected = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    got = layer(x)
    assert got.shape == (*shape, 250)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_split_path_taken_only_for_few_rows_float32_cpu_even_out(monkeypatch):
    calls = []
    real = linear_module.split_gemv
    monkeypatch.setattr(linear_module, "split_gemv", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    torch.manual_seed(0)
    wide = SPLIT_NARROW_INPUT + 2
    even, odd, even_wide = Linear(16, 8), Linear(16, 7), Linear(wide, 8)
    even(torch.randn(1, SPLIT_MAX_ROWS_NARROW, 16))
    even_wide(torch.randn(1, SPLIT_MAX_ROWS, wide))
    assert calls == [SPLIT_MAX_ROWS_NARROW, SPLIT_MAX_ROWS]
    even(torch.randn(1, SPLIT_MAX_ROWS_NARROW + 1, 16))  # prefill-sized: F.linear
    even_wide(torch.randn(1, SPLIT_MAX_ROWS + 1, wide))  # wide input, more than 4 rows: F.linear
    odd(torch.randn(1, 1, 16))  # odd output width cannot be halved
    even.double()(torch.randn(1, 1, 16, dtype=torch.float64))  # only float32 measured faster
    assert calls == [SPLIT_MAX_ROWS_NARROW, SPLIT_MAX_ROWS]


def test_state_dict_is_that_of_nn_linear():
    layer = Linear(8, 6, bias=True)
    plain = torch.nn.Linear(8, 6, bias=True)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(plain(x), layer(x))


def test_opaque_split_gemv_passes_opcheck():
    """The custom op's fake kernel (shapes, strides) must match what the real one returns."""
    torch.manual_seed(0)
    for rows in (1, 3, 8):
        torch.library.opcheck(linear_module.opaque_split_gemv, (torch.randn(rows, 24), torch.randn(10, 24)))


@torch.inference_mode()
def test_compiled_linear_matches_f_linear_for_one_and_several_rows():
    torch.manual_seed(0)
    layer = Linear(48, 20, bias=True)
    compiled = torch.compile(layer, dynamic=True)
    for rows in (1, 3, SPLIT_MAX_ROWS_NARROW, 17):
        x = torch.randn(1, rows, 48)
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
