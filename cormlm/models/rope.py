"""Rotary position embeddings: default, linear, dynamic NTK, Llama 3 and YaRN.

Each variant only changes the inverse frequencies (and, for YaRN, a scale on cos/sin);
the rotation itself is shared. Frequencies are computed in float32 like the reference
implementations, so logits match them to float rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, RopeConfig


def rotary_dim(config: ModelConfig) -> int:
    return int(config.head_dim * config.rope.partial_rotary_factor)


def base_inv_freq(theta: float, dim: int, device: torch.device | None = None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama 3.1: long wavelengths are divided by ``factor``, short ones kept, a smooth
    blend in between."""
    original = rope.original_max_position_embeddings
    low_wavelen = original / rope.low_freq_factor
    high_wavelen = original / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(rope: RopeConfig, dim: int, device: torch.device | None) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp in between."""
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        original = rope.original_max_position_embeddings
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    freqs = rope.theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    inv_freq = (1.0 / (factor * freqs)) * (1 - extrapolation_weight) + (1.0 / freqs) * extrapolation_weight
    return inv_freq, attention_factor


def static_inv_freq(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scale that do not depend on the sequence length."""
    rope, dim = config.rope, rotary_dim(config)
    inv_freq = base_inv_freq(rope.theta, dim, device)
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        return llama3_inv_freq(rope, inv_freq), 1.0
    if rope.type == "yarn":
        return _yarn_inv_freq(rope, dim, device)
    return inv_freq, 1.0


def dynamic_ntk_inv_freq(config: ModelConfig, seq_len: int, device: torch.device | None) -> torch.Tensor:
    """Dynamic NTK: past the trained length, the base grows with the sequence length."""
    rope, dim = config.rope, rotary_dim(config)
    trained = config.max_position_embeddings
    seq_len = max(seq_len, trained)
    theta = rope.theta * ((rope.factor * seq_len / trained) - (rope.factor - 1)) ** (dim / (dim - 2))
    return base_inv_freq(theta, dim, device)


class RotaryEmbedding(nn.Module):
    """Maps positions to (cos, sin); holds no learned weights, only derived frequencies."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, scale = static_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = scale

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute derived frequencies on ``device`` (after loading onto meta tensors)."""
        self.inv_freq = static_inv_freq(self.config, device)[0]

    def forward(self, positions: torch.Tensor, max_position: int | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation tables for integer ``positions`` [B, T], made once per forward call
        for every layer: cos and signed sin [B, T, 1, rotary_dim] in ``dtype`` (see
        :func:`apply_rotary`), computed in float32.

        ``max_position`` (the largest position in the call, a host int) selects the
        dynamic-NTK frequencies without a device sync.
        """
        inv_freq = self.inv_freq
        if self.config.rope.type == "dynamic" and max_position is not None:
            if max_position + 1 > self.config.max_position_embeddings:
                inv_freq = dynamic_ntk_inv_freq(self.config, max_position + 1, inv_freq.device)
        angles = positions.clamp(min=0).float()[..., None, None] * inv_freq  # [B, T, 1, dim/2]
        cos, sin = angles.cos() * self.scale, angles.sin() * self.scale
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x`` [B, T, H, D] (half-split layout).

    The rotation ``x * cos + rotate_half(x) * sin``, with ``rotate_half(x) = (-x2, x1)``,
    written as ``x * cos + (x2, x1) * (-sin, sin)``: the same products (a sign moved from
    an operand to a table), so the same bits, in four operations on the whole tensor. The
    model rotates queries and keys of all heads in one call.
    """
    dim, half = cos.shape[-1], cos.shape[-1] // 2
    rot = x if dim == x.shape[-1] else x[..., :dim]
    # (x2, x1) * (-sin, sin) written half by half into one tensor: torch.roll would first
    # copy x into a tensor of its own (a prompt's fresh tensors cost page faults). Training
    # (out= has no gradient) and compiled graphs (Dynamo breaks the graph at out= into
    # views; inductor fuses the roll anyway) take the roll.
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            rot.requires_grad or cos.requires_grad or signed_sin.requires_grad)):
        swapped = torch.roll(rot, half, dims=-1) * signed_sin
    else:
        swapped = torch.empty_like(rot)
        torch.mul(rot[..., half:], signed_sin[..., :half], out=swapped[..., :half])
        torch.mul(rot[..., :half], signed_sin[..., half:], out=swapped[..., half:])
    out = (rot * cos).add_(swapped)
    return out if dim == x.shape[-1] else torch.cat((out, x[..., dim:]), dim=-1)
