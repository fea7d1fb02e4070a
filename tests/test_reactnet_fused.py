"""ReActNet's shifted sign backward with the fused formulas (bnnbench.elementwise.shifted_approx_sign_backward): the
gradient to x bit for bit torch's formula's (grad * max(0, 2 - 2|x + beta|) in float32, rounded to x's dtype), the
gradient to the per-channel shift beta summed in the same pass, within float32's rounding of the float64 sum and no
further from it than torch's sum; the same bits on one and two threads; the choice made in the forward's context;
torch's formulas (``formulas(bf16="torch")``, ``fp32`` by default) keep the bit-exact path of tests/test_fast_path.py."""

from __future__ import annotations

import pytest
import torch

import bnnbench
from bnnbench import elementwise, functional
from bnnbench.functional import formulas as chosen_formulas

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
SHAPES = pytest.mark.parametrize("shape", [(64, 16, 32, 32), (7, 3, 5, 9), (3, 5, 1, 1), (2, 4, 8)], ids=str)
EDGES = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, float("nan"), float("inf"), -float("inf"), 1e-39, 3e38]


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (with values at the surrogate's kinks every 7th element), grad of x's shape and dtype, a float32 shift."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 0.8).to(dtype)
    x.view(-1)[::7] = 1.0
    grad = torch.randn(shape, generator=generator).to(dtype)
    shift = torch.randn(shape[1], *([1] * (len(shape) - 2)), generator=generator) * 0.3
    shift.view(-1)[0] = 0.0
    return x, grad, shift


def torch_formula(x: torch.Tensor, shift: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd's gradients through ``surrogate_sign(x + shift)`` with ApproxSign's surrogate: the products in float32
    (x + shift's dtype), the gradient to x cast to x's dtype, the shift's torch's float32 sum."""
    product = grad * functional.approx_sign_derivative(x + shift)
    return product.to(x.dtype), product.sum_to_size(shift.shape)


def float64_sum(x: torch.Tensor, shift: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The shift's gradient from the same float32 products, summed in float64."""
    total = (x.float() + shift).double()
    product = grad.double() * (2 - 2 * total.abs()).clamp(min=0)
    return product.float().double().sum_to_size(shift.shape)


@DTYPES
@SHAPES
@pytest.mark.parametrize("threads", [1, 2])
def test_gradient_to_x_is_torchs_bit_for_bit_and_the_shifts_within_its_rounding(dtype, shape, threads):
    torch.set_num_threads(threads)
    x, grad, shift = inputs(shape, dtype)
    got_x, got_shift = elementwise.shifted_approx_sign_backward(x, shift, grad)
    want_x, want_shift = torch_formula(x, shift, grad)
    assert got_x.dtype == x.dtype and got_shift.dtype == torch.float32 and got_shift.shape == shift.shape
    assert torch.equal(got_x.view(torch.int16 if dtype == torch.bfloat16 else torch.int32), want_x.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    exact = float64_sum(x, shift, grad)
    scale = exact.abs().sum().item() + 1e-30  # (a cancelling sum: its error scales with the summands' size)
    assert (got_shift.double() - exact).abs().max().item() / scale < 1e-6
    assert (got_shift.double() - exact).norm().item() <= 1.5 * (want_shift.double() - exact).norm().item() + 1e-6 * scale


@DTYPES
def test_edge_values_give_torchs_gradient_to_x(dtype):
    x = torch.tensor(EDGES * 6, dtype=torch.float32).reshape(2, 3, len(EDGES)).to(dtype)
    shift = torch.tensor([0.0, 1.0, -0.25]).reshape(3, 1)
    grad = torch.linspace(-2, 2, x.numel()).reshape(x.shape).to(dtype)
    got_x, got_shift = elementwise.shifted_approx_sign_backward(x, shift, grad)
    want_x, want_shift = torch_formula(x, shift, grad)
    assert torch.equal(got_x.isnan(), want_x.isnan()) and torch.equal(got_x[~got_x.isnan()], want_x[~want_x.isnan()])
    assert torch.equal(got_shift.isnan(), want_shift.isnan())


@DTYPES
def test_one_and_two_threads_give_the_same_bits(dtype):
    x, grad, shift = inputs((32, 16, 16, 16), dtype, seed=3)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(elementwise.shifted_approx_sign_backward(x, shift, grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_inputs_the_kernel_does_not_take_are_left_to_torchs_formula():
    x, grad, shift = inputs((4, 3, 5, 5), torch.float32)
    assert elementwise.shifted_approx_sign_backward(x.double(), shift.double(), grad.double()) is None
    assert elementwise.shifted_approx_sign_backward(x.bfloat16(), shift.bfloat16(), grad.bfloat16()) is None  # a bf16 shift: bf16 sums
    assert elementwise.shifted_approx_sign_backward(x.transpose(2, 3), shift, grad.transpose(2, 3)) is None  # neither layout
    assert elementwise.shifted_approx_sign_backward(x, shift.reshape(3), grad) is None  # no per-channel shape


@DTYPES
def test_reactnet_takes_the_fused_pass_where_the_forwards_formulas_say_so(dtype, monkeypatch):
    """Through ReActNet's activation: fused (bf16's default, fp32's opt-in) and torch's formulas give the same
    gradient to a and nearly the same to beta; the forward's context decides, not the backward's."""
    method = bnnbench.get_method("reactnet")
    x, grad, _ = inputs((8, 4, 6, 6), dtype, seed=5)
    calls = []
    original = elementwise.shifted_approx_sign_backward
    monkeypatch.setattr(elementwise, "shifted_approx_sign_backward", lambda *a: calls.append(1) or original(*a))
    dtype_key = "bf16" if dtype == torch.bfloat16 else "fp32"

    def gradients(choice: str) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_()
        beta = (torch.arange(4, dtype=torch.float32).reshape(4, 1, 1) * 0.1).requires_grad_()
        with chosen_formulas(**{dtype_key: choice}):
            out = method.activation(leaf, 0.5, beta=beta)
        with chosen_formulas(**{dtype_key: "torch" if choice == "fused" else "fused"}):  # the backward's own choice is ignored
            out.backward(grad)
        return leaf.grad, beta.grad

    fused = gradients("fused")
    assert len(calls) == 1
    torchs = gradients("torch")
    assert len(calls) == 1
    assert torch.equal(fused[0], torchs[0])
    assert torch.allclose(fused[1], torchs[1], rtol=1e-5, atol=1e-5)
    assert method.takes_bf16_formulas and method.takes_fp32_formulas
