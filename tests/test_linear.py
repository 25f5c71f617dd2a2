"""Every linear kernel must compute what F.linear computes, and be chosen by measurement, not by constants."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from cormlm.errors import InputError
from cormlm.models import linear as linear_module
from cormlm.models.linear import FORCE_ENV, SPLIT_MAX_ROWS, TRANSPOSED_MAX_ROWS, TRIALS, Linear, kernel_choices, row_bucket


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.setattr(linear_module, "_choices", {})
    monkeypatch.setattr(linear_module, "_trials", {})
    monkeypatch.setattr(linear_module, "_broken", set())
    monkeypatch.setattr(linear_module, "_graph_choices", {})
    monkeypatch.delenv(FORCE_ENV, raising=False)


def _all_kernels() -> list[str]:
    with torch.inference_mode():
        return linear_module.candidates(torch.ones(1, 4), torch.ones(2, 4))


@pytest.mark.parametrize("kernel", ["split", "linear", "onednn", "linear_t", "onednn_t", "rows", "rows_l2", None])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 1), (2, 2), (4, 1), (2, 4), (1, 5), (3, 7)])
@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_every_kernel_matches_f_linear(monkeypatch, kernel, shape, bias):
    if kernel is not None:
        monkeypatch.setenv(FORCE_ENV, kernel)
    torch.manual_seed(0)
    layer = Linear(96, 250, bias=bias)
    x = torch.randn(*shape, 96)
    expected = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    for _ in range(len(_all_kernels()) * (TRIALS + 1) if kernel is None else 1):  # every trial call is right too
        got = layer(x)
        assert got.shape == (*shape, 250)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_onednn_is_offered_where_torch_has_it():
    """This machine's torch (an x86 CPU wheel) is built with oneDNN and it has a C compiler:
    all seven kernels compete for a few rows; F.linear and oneDNN for many."""
    assert _all_kernels() == ["linear", "split", "onednn", "linear_t", "onednn_t", "rows", "rows_l2"]
    with torch.inference_mode():
        assert linear_module.candidates(torch.ones(17, 4), torch.ones(2, 4)) == ["linear", "onednn"]


def test_bfloat16_products_match_f_linear_on_every_kernel(monkeypatch):
    torch.manual_seed(0)
    layer = Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    for kernel in _all_kernels():
        monkeypatch.setenv(FORCE_ENV, kernel)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)


def _slow_kernel(monkeypatch, *slow: str) -> list[str]:
    """Make the ``slow`` kernels 2 ms slower than the others; returns the kernels run, in order."""
    ran: list[str] = []
    kernels = dict(linear_module.KERNELS)

    def timed(name):
        def kernel(x, w, b=None):
            ran.append(name)
            if name in slow:
                time.sleep(0.002)
            return kernels[name](x, w, b)
        return kernel

    monkeypatch.setattr(linear_module, "KERNELS", {name: timed(name) for name in kernels})
    monkeypatch.setattr(linear_module.F, "linear", timed("linear"))
    return ran


@pytest.mark.parametrize("fast", ["linear", "split", "onednn", "linear_t", "onednn_t", "rows", "rows_l2"])
@torch.inference_mode()
def test_kernels_rotate_in_place_then_the_fastest_is_kept_per_shape(monkeypatch, fast):
    kernels = _all_kernels()
    ran = _slow_kernel(monkeypatch, *(name for name in kernels if name != fast))
    layer, other_rows = Linear(16, 8), Linear(16, 8)
    for _ in range(len(kernels) * (TRIALS + 1) - 1):  # trials, one call each, rotating; one untimed warm-up of each
        layer(torch.randn(1, 1, 16))
    assert ran == kernels * TRIALS + kernels[:-1] and kernel_choices() == []
    layer(torch.randn(1, 1, 16))  # the last trial: now decided
    assert kernel_choices() == [f"8x16, 1 row, float32, {torch.get_num_threads()} threads: {linear_module.NAMES[fast]}"]
    ran.clear()
    for _ in range(3):
        layer(torch.randn(1, 1, 16))
        other_rows(torch.randn(1, 1, 16))  # another layer of the same shape shares the choice
    assert ran == [fast] * 6
    ran.clear()
    layer(torch.randn(1, 2, 16))  # two rows: a shape of its own, measured from scratch
    assert ran == ["linear"]


def test_rows_share_a_choice_within_a_power_of_two_bucket():
    assert [row_bucket(n) for n in (1, 2, 7, 8, 9, 16, 17, 1000, 1024, 1025)] == [1, 2, 7, 8, 16, 16, 32, 1024, 1024, 2048]


@torch.inference_mode()
def test_prefill_sized_products_are_measured_without_the_few_row_kernels(monkeypatch):
    ran = _slow_kernel(monkeypatch)
    layer = Linear(16, 8)
    for _ in range(2 * (TRIALS + 1)):
        layer(torch.randn(1, TRANSPOSED_MAX_ROWS + 1 + _, 16))  # 17..34 rows: buckets 32 and 64
    assert set(ran) == {"linear", "onednn"}
    assert Linear(16, 7)(torch.randn(1, 1, 16)).shape == (1, 1, 7) and "split" not in ran  # odd width: no halves


def test_products_that_need_gradients_never_go_through_onednn(monkeypatch):
    ran = _slow_kernel(monkeypatch)
    layer = Linear(16, 8)
    x = torch.randn(2, 16, requires_grad=True)
    for _ in range(5 * (TRIALS + 1)):
        layer(x).sum().backward()
    assert not any(name.startswith("onednn") or name.startswith("rows") for name in ran) and x.grad is not None


def test_forced_kernel_skips_measurement_and_falls_back_where_it_cannot_run(monkeypatch):
    ran = _slow_kernel(monkeypatch, "split")
    with torch.inference_mode():
        for kernel in ("split", "onednn", "linear"):
            monkeypatch.setenv(FORCE_ENV, kernel)
            Linear(16, 8)(torch.randn(1, 1, 16))
        monkeypatch.setenv(FORCE_ENV, "split")
        Linear(16, 8)(torch.randn(1, SPLIT_MAX_ROWS + 1, 16))  # too many rows for the split: F.linear
    assert ran == ["split", "onednn", "linear", "linear"] and linear_module._trials == {}


def test_a_misspelt_forced_kernel_is_an_error_that_names_the_choices(monkeypatch):
    monkeypatch.setenv(FORCE_ENV, "mkl")
    names = "linear, split, onednn, linear_t, onednn_t"
    with pytest.raises(InputError, match=rf"CORMLM_LINEAR_KERNEL='mkl' is not a kernel; use one of {names}"):
        with torch.inference_mode():
            Linear(16, 8)(torch.randn(1, 1, 16))


@torch.inference_mode()
def test_a_kernel_that_fails_on_this_machine_is_dropped_for_f_linear(monkeypatch):
    def broken(x, w, b=None):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(linear_module, "KERNELS", {**linear_module.KERNELS, "onednn": broken})
    layer = Linear(16, 8)
    x = torch.randn(3, 16)
    for _ in range(5 * (TRIALS + 1)):
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert linear_module._broken == {"onednn"} and not any(c.endswith(": oneDNN") for c in kernel_choices())


@pytest.mark.parametrize("threads", [1, 2, 3])
@torch.inference_mode()
def test_the_few_row_c_kernel_matches_float64_on_every_row_count_and_ragged_shapes(threads):
    """Every row count has its own C function; widths off the vector length and weight rows
    off the per-thread span take the kernel's tail loops; wide inputs (4099 columns: over half
    of any L1 at 2 rows or more) are taken in column chunks that add into the output, the bias
    once (the first plan; the second reads them whole)."""
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in range(1, linear_module.ROWS_MAX + 1):
            for out_features, in_features in [(1, 1), (7, 5), (25, 17), (49, 100), (97, 576), (3, 1536), (9, 4099)]:
                x, w, b = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
                for bias, plan in itertools.product((None, b), linear_module.ROWS_PLANS.values()):
                    expected = F.linear(x.double(), w.double(), None if bias is None else bias.double())
                    torch.testing.assert_close(linear_module.rows_gemm(x, w, bias, plan).double(), expected,
                                               rtol=1e-5, atol=1e-4)
        # only a contiguous weight is offered to any kernel but F.linear (the C kernel reads it as laid out)
        assert linear_module.candidates(torch.randn(1, 8), torch.randn(8, 4).t()) == ["linear"]
        strided = torch.randn(3, 40)[:, ::2]  # a strided input is read as its values
        torch.testing.assert_close(linear_module.rows_gemm(strided, w[:, :20].contiguous()), strided @ w[:, :20].T)
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def test_the_few_row_c_kernel_built_for_8_lane_vectors_matches_float64(narrow_vectors):
    narrow_vectors(linear_module.ROWS_GEMM)
    torch.manual_seed(1)
    for rows in range(1, linear_module.ROWS_MAX + 1):
        for out_features, in_features in [(7, 5), (25, 17), (97, 576), (3, 1536), (9, 4099)]:
            x, w, b = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
            expected = F.linear(x.double(), w.double(), b.double())
            for plan in linear_module.ROWS_PLANS.values():
                torch.testing.assert_close(linear_module.rows_gemm(x, w, b, plan).double(), expected, rtol=1e-5,
                                           atol=1e-4)


@pytest.mark.parametrize("kernel", ["split", "linear", "onednn", "linear_t", "onednn_t", "rows", "rows_l2", None])
@torch.inference_mode()
def test_a_product_of_no_rows_is_empty_on_every_kernel(monkeypatch, kernel):
    if kernel is not None:
        monkeypatch.setenv(FORCE_ENV, kernel)
    layer = Linear(16, 8)
    for _ in range(len(_all_kernels()) * (TRIALS + 1) if kernel is None else 1):
        assert layer(torch.randn(0, 16)).shape == (0, 8)
    assert not {"rows", "rows_l2"} & set(linear_module.candidates(torch.randn(0, 16), layer.weight))


@torch.inference_mode()
def test_without_the_c_kernel_the_other_kernels_compete(monkeypatch):
    monkeypatch.setattr(linear_module.ROWS_GEMM, "function", lambda: None)
    assert not {"rows", "rows_l2"} & set(_all_kernels()) and "split" in _all_kernels()
    assert not linear_module.adopt_graph_choices({(8, 16, 1, torch.float32): "rows"})  # a saved choice it cannot run
    monkeypatch.setenv(FORCE_ENV, "rows")
    layer = Linear(16, 8)
    x = torch.randn(1, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))  # forced but absent: F.linear


def test_state_dict_is_that_of_nn_linear():
    layer = Linear(8, 6, bias=True)
    plain = torch.nn.Linear(8, 6, bias=True)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(plain(x), layer(x))


@torch.inference_mode()
def test_compiled_linear_matches_f_linear_for_one_and_several_rows(monkeypatch):
    monkeypatch.setenv(FORCE_ENV, "split")  # eager would split; compiled graphs use F.linear
    torch.manual_seed(0)
    layer = Linear(48, 20, bias=True)
    compiled = torch.compile(layer, dynamic=True)
    for rows in (1, 3, SPLIT_MAX_ROWS, 17):
        x = torch.randn(1, rows, 48)
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_compiled_graphs_call_the_kernel_measured_for_their_rows(monkeypatch):
    """A graph cannot time kernels: it calls what was decided before tracing (oneDNN as an
    opaque op), for concrete rows by their bucket and for symbolic rows by the prefill bucket."""
    torch._dynamo.reset()
    calls: list[tuple[int, int]] = []
    real = linear_module.onednn_linear

    def counting(x, w, b=None):
        calls.append((x.shape[0], w.shape[0]))
        return real(x, w, b)

    monkeypatch.setattr(linear_module, "onednn_linear", counting)
    torch.manual_seed(0)
    first, second = Linear(48, 20), Linear(20, 48)
    for rows in (1, row_bucket(linear_module.CALIBRATION_ROWS[-1])):  # 48 -> 20 through oneDNN, 20 -> 48 by F.linear
        monkeypatch.setitem(linear_module._graph_choices, (20, 48, rows, torch.float32), "onednn")
        monkeypatch.setitem(linear_module._graph_choices, (48, 20, rows, torch.float32), "linear")
    monkeypatch.setitem(linear_module._graph_choices, (48, 20, 1, torch.float32), "onednn_t")  # one token: transposed
    compiled = torch.compile(lambda x: second(first(x)), dynamic=True)
    frames = counters["stats"]["unique_graphs"]
    for rows in (1, 17, 30):  # 1: one token (decode); 17 and 30: one symbolic graph (the prefill bucket's choice)
        x = torch.randn(rows, 48)
        torch.testing.assert_close(compiled(x), F.linear(F.linear(x, first.weight, first.bias), second.weight, second.bias),
                                   rtol=1e-5, atol=1e-5)
    assert calls == [(1, 20), (48, 1), (17, 20), (30, 20)]  # transposed: the weight is the rows
    assert counters["stats"]["unique_graphs"] - frames == 2  # rows 1, then every other row count


@pytest.mark.parametrize("kernel", ["rows", "rows_l2"])
@torch.inference_mode()
def test_compiled_decode_graphs_call_the_c_kernel_as_one_opaque_op(monkeypatch, kernel):
    torch._dynamo.reset()
    calls: list[tuple[int, int]] = []
    real = linear_module.rows_gemm
    monkeypatch.setattr(linear_module, "rows_gemm",
                        lambda x, w, b=None, plan=0: calls.append((x.shape[0], plan)) or real(x, w, b, plan))
    torch.manual_seed(0)
    layer = Linear(48, 20)
    monkeypatch.setitem(linear_module._graph_choices, (20, 48, 3, torch.float32), kernel)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 1, 48)  # three rows of one token: a decode step of batch 3
    torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert calls == [(3, linear_module.ROWS_PLANS[kernel])]


def test_calibrate_decides_every_product_of_a_model_before_compiling():
    model = torch.nn.Sequential(Linear(32, 64), Linear(64, 32), Linear(32, 64))
    linear_module.calibrate(model, rows=(1, 40))
    decided = {key[:3] for key in linear_module._choices}
    assert decided == {(64, 32, 1), (32, 64, 1), (64, 32, 64), (32, 64, 64)} and linear_module._trials == {}
    assert {key[:3] for key in linear_module._graph_choices} == decided  # what compiled graphs will call


def test_calibrate_under_a_forced_kernel_runs_no_trials_and_graphs_take_that_kernel(monkeypatch):
    monkeypatch.setenv(FORCE_ENV, "onednn")
    model = torch.nn.Sequential(Linear(32, 64), Linear(64, 32))
    linear_module.calibrate(model, rows=(1, 40))  # returns at once: nothing is measured
    assert linear_module._choices == {} and linear_module._trials == {}
    assert linear_module._graph_choices == {(64, 32, 1, torch.float32): "onednn", (32, 64, 1, torch.float32): "onednn",
                                            (64, 32, 64, torch.float32): "onednn", (32, 64, 64, torch.float32): "onednn"}
    assert linear_module.graph_kernel_choices() == [  # what benchmarks print of compiled graphs
        "32x64, 1 row, float32: oneDNN", "32x64, 64 rows (bucket), float32: oneDNN",
        "64x32, 1 row, float32: oneDNN", "64x32, 64 rows (bucket), float32: oneDNN"]
