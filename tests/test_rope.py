"""apply_rotary against the rotation as written in Llama: x * cos + rotate_half(x) * sin,
bit for bit (full and partial rotary, float32 and bfloat16, strided views of a fused
projection as the model passes them)."""

from __future__ import annotations

import pytest
import torch

from cormlm.models.rope import apply_rotary


def _reference(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor) -> torch.Tensor:
    dim = 2 * cos_half.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    x1, x2 = rot[..., :dim // 2], rot[..., dim // 2:]
    rotate_half = torch.cat((-x2, x1), dim=-1)
    cos, sin = torch.cat((cos_half, cos_half), dim=-1), torch.cat((sin_half, sin_half), dim=-1)
    return torch.cat((rot * cos + rotate_half * sin, rest), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (64, 32), (16, 16)])
def test_rotation_equals_the_rule_bit_for_bit(dtype, head_dim, rotary_dim):
    torch.manual_seed(head_dim + rotary_dim)
    b, t, heads = 2, 7, 5
    fused = torch.randn(b, t, (heads + 2) * head_dim, dtype=dtype)  # q and k of a fused projection, then v
    x = fused[..., :heads * head_dim].view(b, t, heads, head_dim)  # a strided view, as the model rotates
    angles = torch.randn(b, t, 1, rotary_dim // 2)
    cos_half, sin_half = angles.cos().to(dtype), angles.sin().to(dtype)
    signed_sin = torch.cat((-sin_half, sin_half), dim=-1)
    before = x.clone()
    got = apply_rotary(x, torch.cat((cos_half, cos_half), dim=-1), signed_sin)
    expected = _reference(x, cos_half, sin_half)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, expected)
    assert torch.equal(x, before)  # the input is left as it was


def test_rotation_under_autograd_has_the_same_values_and_a_gradient():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 3, 16, requires_grad=True)
    angles = torch.randn(1, 4, 1, 8)
    cos_half, sin_half = angles.cos(), angles.sin()
    cos, signed_sin = torch.cat((cos_half, cos_half), dim=-1), torch.cat((-sin_half, sin_half), dim=-1)
    got = apply_rotary(x, cos, signed_sin)
    assert torch.equal(got.detach(), _reference(x.detach(), cos_half, sin_half))
    got.pow(2).sum().backward()
    # a rotation keeps each pair's norm: the gradient of the squared norm is 2x
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=1e-5, atol=1e-5)
