"""The RMS norm's C kernel (decode rows) against the rule, and where the module uses it."""

import pytest
import torch
import torch.nn.functional as F

from cormlm.models import norms
from cormlm.models.norms import KERNEL_MAX_ROWS, RMSNorm, add_and_norm


def rule(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in float64."""
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def check_kernel_rows() -> None:
    torch.manual_seed(0)
    for dim in (1, 5, 17, 576, 1000):
        norm = RMSNorm(dim, 1e-5)
        norm.weight.data = torch.randn(dim)
        for rows in range(1, KERNEL_MAX_ROWS + 1):
            x, delta = torch.randn(rows, 1, dim) * 3, torch.randn(rows, 1, dim)
            assert norm._kernel_takes(x)
            torch.testing.assert_close(norm(x).double(), rule(x, norm.weight, 1e-5), rtol=1e-5, atol=1e-5)
            total, normed = norm.added(x, delta)
            assert torch.equal(total, x + delta)  # one float addition, as torch rounds it
            torch.testing.assert_close(normed.double(), rule(x + delta, norm.weight, 1e-5), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_the_kernel_equals_the_rule_on_decode_rows_and_widths_off_the_vector_length():
    if norms.RMS_NORM.function() is None:
        pytest.skip(f"no C kernel here: {norms.RMS_NORM.unavailable}")
    check_kernel_rows()


@torch.inference_mode()
def test_the_kernel_built_for_8_lane_vectors_equals_the_rule(narrow_vectors):
    narrow_vectors(norms.RMS_NORM)
    check_kernel_rows()


def test_prompts_gradients_other_dtypes_and_strided_rows_take_torch(monkeypatch):
    """The kernel only where it is exact and pays: anything else is F.rms_norm's (or the
    upcast path's) arithmetic, which the module's other tests hold to the rule."""
    norm = RMSNorm(16, 1e-6)
    calls = []
    real = norms.RMS_NORM.function()
    if real is None:
        pytest.skip(f"no C kernel here: {norms.RMS_NORM.unavailable}")
    monkeypatch.setattr(norms.RMS_NORM, "function", lambda: (lambda *a: calls.append(a) or real(*a)))
    with torch.inference_mode():
        norm(torch.randn(KERNEL_MAX_ROWS + 1, 1, 16))  # a prompt's rows
        norm(torch.randn(2, 32)[:, ::2])  # strided
        norm(torch.randn(2, 16, dtype=torch.bfloat16))
    with torch.no_grad():
        norm(torch.randn(2, 16, dtype=torch.float64))
    x = torch.randn(2, 16, requires_grad=True)
    y = norm(x)  # autograd: torch's operations
    y.sum().backward()
    assert x.grad is not None and not calls
    with torch.inference_mode():
        norm(torch.randn(2, 16))
        norm.added(torch.randn(2, 16), torch.randn(2, 16))
        x, strided = torch.randn(2, 16), torch.randn(2, 32)[:, ::2]
        total, normed = norm.added(x, strided)  # a strided branch: torch adds, the kernel norms the sum
    assert len(calls) == 3 and calls[1][1] is not None and calls[2][1] is None
    assert torch.equal(total, x + strided)
    torch.testing.assert_close(normed, F.rms_norm(x + strided, (16,), norm.weight, 1e-6))


@torch.inference_mode()
def test_add_and_norm_takes_any_norm():
    """A LayerNorm model (Falcon) adds, then norms, as before."""
    x, delta = torch.randn(3, 8), torch.randn(3, 8)
    layer_norm = torch.nn.LayerNorm(8)
    total, normed = add_and_norm(layer_norm, x, delta)
    assert torch.equal(total, x + delta) and torch.equal(normed, layer_norm(x + delta))
    rms = RMSNorm(8, 1e-5)
    total, normed = add_and_norm(rms, x, delta)
    torch.testing.assert_close(normed, F.rms_norm(x + delta, (8,), rms.weight, 1e-5))
