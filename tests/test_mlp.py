"""A prompt's gated MLP runs in chunks of rows on the halves of the fused gate/up matrix:
the same arithmetic as one fused product, chunk boundaries and biases included."""

from __future__ import annotations

import pytest
import torch

from cormlm.config import ModelConfig
from cormlm.models import mlp as mlp_module
from cormlm.models.linear import Linear
from cormlm.models.mlp import CHUNK_MIN_ROWS, GatedMLP, chunk_rows


def _config(bias: bool, activation: str) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=32, hidden_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                       head_dim=12, intermediate_size=80, max_position_embeddings=4096, mlp_bias=bias,
                       activation=activation)


def _fused(mlp: GatedMLP, x: torch.Tensor, bias: bool) -> torch.Tensor:
    """The rule written out: down(act(gate(x)) * up(x)) from one product with the fused matrix."""
    gate, up = torch.nn.functional.linear(x, mlp.gate_up.weight, mlp.gate_up.bias).split(mlp.intermediate, dim=-1)
    down_bias = mlp.down.bias if bias else None
    return torch.nn.functional.linear(mlp.act(gate) * up, mlp.down.weight, down_bias)


@pytest.mark.parametrize("rows", [CHUNK_MIN_ROWS + 1, 3 * CHUNK_MIN_ROWS, 5 * CHUNK_MIN_ROWS + 7])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", "relu", "gelu_new"])  # in place, in place, not
def test_chunked_prompt_mlp_equals_the_fused_product(monkeypatch, rows, with_bias, activation):
    # chunks of CHUNK_MIN_ROWS rows: several chunks, the last one short
    monkeypatch.setattr(mlp_module, "CHUNK_BYTES", 1)
    torch.manual_seed(rows)
    mlp = GatedMLP(_config(with_bias, activation))
    x = torch.randn(2, rows // 2 + 1, 48)
    for down_bias in (True, False):
        expected = _fused(mlp, x, down_bias)
        with torch.inference_mode():
            got = mlp(x, down_bias)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        residual = torch.randn_like(expected)
        with torch.inference_mode():
            summed = mlp.added_to(residual.clone(), x, down_bias)
        torch.testing.assert_close(summed, residual + expected, rtol=1e-5, atol=1e-5)


def test_chunks_are_powers_of_two_within_the_byte_bound():
    assert chunk_rows(1536, 4) == 512  # 4 MiB / (1536 x 4 B) = 682 rows, down to a power of two
    assert chunk_rows(1536, 2) == 1024
    assert chunk_rows(10**6, 4) == CHUNK_MIN_ROWS  # never below the GEMM's efficient row count
    for intermediate in (80, 1536, 8192, 14336):
        rows = chunk_rows(intermediate, 4)
        assert rows & (rows - 1) == 0 and (rows == CHUNK_MIN_ROWS or rows * intermediate * 4 <= mlp_module.CHUNK_BYTES)


def test_the_chunked_path_makes_no_full_size_activation(monkeypatch):
    """The point of the chunks: no product ever has more rows than a chunk."""
    monkeypatch.setattr(mlp_module, "CHUNK_BYTES", 1)
    seen = []
    part = Linear.part

    def spy(self, x, start, stop):
        seen.append(x.shape[0])
        return part(self, x, start, stop)

    monkeypatch.setattr(Linear, "part", spy)
    mlp = GatedMLP(_config(False, "silu"))
    with torch.inference_mode():
        mlp(torch.randn(1, 4 * CHUNK_MIN_ROWS + 3, 48))
    assert max(seen) == CHUNK_MIN_ROWS and len(seen) == 2 * 5


def test_a_linear_layers_part_is_that_block_of_its_output():
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=True)
    x = torch.randn(300, 24)
    with torch.inference_mode():
        full = torch.nn.functional.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(layer.part(x, 10, 30), full[:, 10:30])
