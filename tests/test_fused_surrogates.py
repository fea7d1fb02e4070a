"""The fused surrogate derivatives (one-pass kernels around torch's transcendental passes) give, bit for bit, the
torch formulas they replace: float32 and bfloat16, edge values, every bfloat16 pattern, scheduled scalars at the
schedules' ends and between, as 0-dim float64 tensors (a layer's progress buffer) and as floats."""

from __future__ import annotations

import numpy as np
from numba import njit
import pytest
import torch

import bnnbench
import bnnbench.elementwise as elementwise
import bnnbench.methods.fda as fda
import bnnbench.methods.irnet as irnet
import bnnbench.methods.reste as reste
import bnnbench.methods.swish_sign as swish_sign
from bnnbench import omp
from bnnbench.functional import formulas as chosen_formulas
from bnnbench.elementwise import r

EDGES = [0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 1e-39, -1e-39, 3.0, -3.0]
EDGES += [1.0, -1.0, 1.0 + 2**-23, -(1.0 + 2**-23), 1.0 - 2**-24, 0.5, -0.5, 0.9999, 1e-30, 3e38, -3e38, 0.1, -0.1, 1.5, -1.5]
EDGES += [float(np.float32(0.1)), float(np.nextafter(np.float32(0.1), np.float32(1))), 0.10009765625, 0.099609375, 1.5 + 2**-7]
EVERY_BF16 = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
PROGRESS = [0.0, 1.0, 0.5, 0.3141, 0.999]


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, strides and bits (NaN where NaN, the sign of zeros included)."""
    if not (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a.isnan(), b.isnan())):
        return False
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    keep = ~a.isnan()
    return torch.equal(a.view(ints)[keep], b.view(ints)[keep])


def inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.tensor(EDGES).to(dtype),
        EVERY_BF16.to(dtype),
        (2 * torch.randn(3, 5, 7, 11, generator=generator)).to(dtype),
        (torch.randn(4, 6, 5, 3, generator=generator)).to(dtype).contiguous(memory_format=torch.channels_last),
        torch.randn(0, 3, dtype=dtype),
        (torch.randn(6, 9, generator=generator)).to(dtype)[:, ::2],  # not dense: the torch formula
    ]


def reference(call, x, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(elementwise, "covered", lambda x: False)
        return call(x)


def schedules():
    """The progress values PROGRESS as a layer's float64 buffer and as floats (the schedules' scalars then come as
    0-dim tensors or as floats, which torch rounds differently in bfloat16)."""
    for p in PROGRESS:
        for progress in (torch.tensor(p, dtype=torch.float64), p):
            yield progress


def check(derivative, dtype, monkeypatch):
    """derivative (kernels on) equals derivative with every kernel off, on every input; dense ones took a kernel."""
    calls = []
    run, gather = elementwise.Kernel.__call__, elementwise.look_up
    for x in inputs(dtype):
        with monkeypatch.context() as patch:
            patch.setattr(elementwise.Kernel, "__call__", lambda self, *a: (calls.append(self), run(self, *a))[1])
            patch.setattr(elementwise, "look_up", lambda *a: (calls.append("look_up"), gather(*a))[1])
            fast = derivative(x)
        assert identical(fast, reference(derivative, x, monkeypatch)), (x.shape, x.dtype)
    assert calls, "no kernel ran"


def check_tabulated(formula, *scalars, threads: int = 1):
    """The lookup equals torch's formula with every bfloat16 value in torch's scalar tail (tensors of 64 + 63
    elements: one vectorised step, then 63 elements of scalar code) and in its vectorised body."""
    filler = EVERY_BF16[1000:1064]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for chunk in EVERY_BF16.split(63):
            for x in (torch.cat([filler, chunk]), torch.cat([chunk, filler])):
                fast = elementwise.tabulated(formula, x, *scalars)
                assert fast is not None and identical(fast, formula(x, *scalars)), chunk[:3]
    finally:
        torch.set_num_threads(previous)


@DTYPES
@pytest.mark.parametrize("hp", [{}, {"t_min": 1e-3}], ids=["paper", "upstream"])
def test_irnet_ede_is_the_torch_formula(dtype, hp, monkeypatch):
    method = bnnbench.get_method("irnet", **hp)
    for progress in schedules():
        check(lambda x: method.activation_derivative(x, progress), dtype, monkeypatch)


@pytest.mark.parametrize("hp", [{}, {"t_min": 1e-3}], ids=["paper", "upstream"])
def test_irnet_table_holds_in_torchs_scalar_tail(hp):
    method = bnnbench.get_method("irnet", **hp)
    for progress in (torch.tensor(0.0, dtype=torch.float64), 0.5, torch.tensor(1.0, dtype=torch.float64)):
        check_tabulated(irnet._ede, method.k(progress), method.t(progress))


@DTYPES
@pytest.mark.parametrize("block, threads", [(None, 1), (1000, 1), (1000, 2)], ids=["block", "small-blocks", "2-threads"])
def test_fda_series_is_the_torch_formula(dtype, block, threads, monkeypatch):
    if block is not None:  # float32's blocks: many, a short last one, on 2 threads one per thread
        monkeypatch.setattr(fda, "BLOCK", block)
        monkeypatch.setattr(omp, "PARALLEL_WORK", 1)
    method = bnnbench.get_method("fda")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for progress in schedules():
            check(lambda x: method.activation_derivative(x, progress), dtype, monkeypatch)
        for n in (0, 3, 9):  # an integer n, no max_n
            check(lambda x: fda.fourier_sign_derivative(x, 0.1, n), dtype, monkeypatch)
    finally:
        torch.set_num_threads(previous)


def test_fda_table_holds_in_torchs_scalar_tail():
    method = bnnbench.get_method("fda")
    for progress in (torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.99, dtype=torch.float64), 0.5):
        check_tabulated(fda._fourier, method.omega, method.n_terms(progress), method.n_start + method.n_growth)


@DTYPES
@pytest.mark.parametrize("hp", [{}, {"o_end": 2.0, "t": 1.0 + 2**-7, "interval": 0.25}], ids=["default", "other"])
def test_reste_estimator_is_the_torch_formula(dtype, hp, monkeypatch):
    method = bnnbench.get_method("reste", **hp)
    for progress in schedules():
        check(lambda x: method.activation_derivative(x, progress), dtype, monkeypatch)



@DTYPES
def test_rbnn_derivative_is_the_torch_formula(dtype, monkeypatch):
    method = bnnbench.get_method("rbnn")
    for progress in schedules():
        check(lambda x: method.weight_derivative(x, progress), dtype, monkeypatch)
        check(lambda x: method.activation_derivative(x, progress), dtype, monkeypatch)


@DTYPES
@pytest.mark.parametrize("beta", [5.0, 1.3, 0.1])
def test_swish_sign_derivative_is_the_torch_formula(dtype, beta, monkeypatch):
    check(lambda x: swish_sign.swish_sign_derivative(x, beta), dtype, monkeypatch)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_swish_sign_cosh_of_saturated_activations_is_torchs(threads, layout, monkeypatch):
    """float32 cosh skips the hardtanh's +-1 outputs (their cosh looked up) and calls the C library's coshf for the
    rest, torch's value bit for bit, on 1 and 2 threads, a layout of either kind, with NaN, infinities and zeros
    among them; torch's own cosh_ never runs where the coshf agrees with it."""
    generator = torch.Generator().manual_seed(5)
    x = (1.5 * torch.randn(3, 4, 37, 41, generator=generator)).clamp(-1, 1)
    x.view(-1)[:9] = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 1.0, -1.0])
    x = x.contiguous(memory_format=layout)
    assert 0.2 < (x.abs() == 1).float().mean() < 0.6
    ran = []
    cosh_ = torch.cosh_
    monkeypatch.setattr(torch, "cosh_", lambda t: (ran.append(t), cosh_(t))[1])
    monkeypatch.setattr(omp, "PARALLEL_WORK", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = swish_sign.swish_sign_derivative(x, 5.0)
    finally:
        torch.set_num_threads(previous)
    assert swish_sign._coshf_is_torchs() and not ran
    assert identical(fast, swish_sign._swish_sign(x, 5.0))


@pytest.mark.parametrize("beta", [5.0, 1.3, 0.1])
def test_swish_sign_tables_hold_in_torchs_scalar_tail(beta):
    """The numerator's table serves body and tail alike; the whole derivative's (cosh) has a tail table of its own."""
    assert elementwise.bf16_tail_table(swish_sign._numerator, beta) is None
    assert elementwise.bf16_tail_table(swish_sign._swish_sign, beta) is not None
    check_tabulated(swish_sign._swish_sign, beta)


def test_reste_tables_hold_in_torchs_scalar_tail():
    """o = 2 makes torch's pow an rsqrt whose bfloat16 tail rounds differently: a tail table of its own."""
    method = bnnbench.get_method("reste", o_end=2.0, t=1.0 + 2**-7, interval=0.25)
    assert elementwise.bf16_tail_table(reste._reste, method.o(1.0), method.interval, method.t) is not None
    for progress in (1.0, torch.tensor(0.3141, dtype=torch.float64)):
        check_tabulated(reste._reste, method.o(progress), method.interval, method.t)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_tables_hold_in_each_threads_scalar_tail(threads):
    """On several threads torch runs the last n % 64 elements of each thread's range through its scalar code: a
    formula whose tail rounds otherwise (SwishSign's cosh, ReSTE's rsqrt at o = 2) must match there, filled with
    exactly the values whose tail differs, for sizes that give each thread a range ending mid-step."""
    method = bnnbench.get_method("reste", o_end=2.0, t=1.0 + 2**-7, interval=0.25)
    cases = [(swish_sign._swish_sign, (5.0,)), (reste._reste, (method.o(1.0), method.interval, method.t))]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for formula, scalars in cases:
            tail = torch.from_numpy(elementwise.bf16_tail_table(formula, *scalars).view(np.int16))
            body = torch.from_numpy(elementwise.bf16_table(formula, *scalars).view(np.int16))
            differing = EVERY_BF16[(tail != body).nonzero().view(-1)]
            assert differing.numel() > 0
            for n in (2 * elementwise.REDUCTION_GRAIN + 37, 100_003, 3 * 65_536 + 1):
                x = differing.repeat(n // differing.numel() + 1)[:n]
                assert identical(elementwise.tabulated(formula, x, *scalars), formula(x, *scalars)), n
    finally:
        torch.set_num_threads(previous)


def test_scalar_tails_follow_torchs_split_between_threads():
    """100,003 elements on 3 threads: ranges of 33,335, 33,335 and 33,333 elements, whose last 55, 55 and 53 are
    scalar code; below 32,768 elements or on one thread, one range."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert elementwise._scalar_tails(100_003) == [(33_280, 33_335), (66_615, 66_670), (99_950, 100_003)]
        assert elementwise._scalar_tails(32_767) == [(32_704, 32_767)]
        torch.set_num_threads(1)
        assert elementwise._scalar_tails(100_003) == [(99_968, 100_003)]
    finally:
        torch.set_num_threads(previous)


def with_and_without_kernels(run, monkeypatch):
    """``run()`` with the kernels (recording the names of those that ran) and with every kernel off (the torch
    formulas): (fast result, reference result, kernel names)."""
    calls = []
    run_kernel = elementwise.Kernel.__call__
    with monkeypatch.context() as patch:
        patch.setattr(elementwise.Kernel, "__call__", lambda self, *a: (calls.append(self.name), run_kernel(self, *a))[1])
        fast = run()
    with monkeypatch.context() as patch:
        patch.setattr(elementwise, "covered", lambda x: False)
        slow = run()
    return fast, slow, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape,layout",
    [((3, 5, 7, 6), "contiguous"), ((3, 5, 7, 6), "channels_last"), ((4, 9), "contiguous"), ((2, 3, 5), "contiguous")],
    ids=["conv", "conv-channels_last", "linear", "3d"],
)
def test_shifted_surrogate_sign_is_autograd_through_the_sum(dtype, shape, layout, monkeypatch):
    """ReActNet's sign(x + beta): forward and both gradients against autograd through the sum with every kernel off,
    a bfloat16 x with a float32 shift included (the sum in float32, the sign in bfloat16, x's gradient rounded to
    bfloat16), with torch's formulas (the fused ones sum beta's gradient in the pass: tests/test_reactnet_fused.py)."""
    generator = torch.Generator().manual_seed(5)
    x = (1.2 * torch.randn(*shape, generator=generator)).to(dtype)
    x.view(-1)[:8] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -1.0, 1.0, 0.5, -1e-40])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    shift = (0.3 * torch.randn(shape[1], *([1] * (len(shape) - 2)), generator=generator))
    shift.view(-1)[0] = -0.5
    grad = torch.randn(*shape, generator=generator)

    def run():
        leaf, beta = x.clone().requires_grad_(), shift.clone().requires_grad_()
        with chosen_formulas(bf16="torch"):
            out = bnnbench.functional.surrogate_sign(leaf, bnnbench.functional.approx_sign_derivative, shift=beta)
        out.backward(grad.to(out.dtype))
        return out.detach(), leaf.grad, beta.grad

    fast, slow, calls = with_and_without_kernels(run, monkeypatch)
    assert all(identical(a, b) for a, b in zip(fast, slow))
    assert fast[0].dtype == x.dtype  # the +-1 values in x's dtype, whatever the shift's
    if layout == "contiguous":
        assert {"shifted_sign", "shifted_approx_sign_grad"} <= set(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("u, alpha", [(1.0, 0.2), (0.37, 0.9999), (2.5, 1e-4), (0.8, 0.55)])
def test_dsq_soft_quantized_sign_is_autograd_through_the_soft_quantizer(dtype, u, alpha, monkeypatch):
    """The sign forward and the gradients to x, u and alpha (through the clamps and the dtype conversions, as
    DSQ's activation takes them) against autograd through straight_through(sign, soft_quantizer), bit for bit."""
    import bnnbench.methods.dsq as dsq

    method = bnnbench.get_method("dsq")
    for x in inputs(dtype)[:4]:
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(dtype).contiguous(memory_format=torch.channels_last if x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format)

        def run():
            leaf, lu, la = x.clone().requires_grad_(), torch.tensor(u, requires_grad=True), torch.tensor(alpha, requires_grad=True)
            with chosen_formulas(bf16="torch"):  # the fused bf16 formulas: tests/test_dsq_bf16.py
                out = method.activation(leaf, 0.5, u=lu, alpha=la)
                out.backward(grad)
            return out.detach(), leaf.grad, lu.grad, la.grad

        fast, slow, calls = with_and_without_kernels(run, monkeypatch)
        assert all(identical(a, b) for a, b in zip(fast, slow)), (x.shape, [identical(a, b) for a, b in zip(fast, slow)])
        assert any(name.startswith("dsq_gradients") for name in calls)
    assert dsq.soft_quantized_sign  # the function the method runs


def test_operand_is_the_scalar_torch_computes_with_in_bfloat16():
    """Over every bfloat16 pattern and many scalars: ``tensor * s``, ``tensor / s`` and ``float * tensor`` use the scalar
    in float32, ``tensor0d * tensor``, ``+``, ``-`` and comparisons the scalar rounded to bfloat16 (through float32)."""
    rng = np.random.default_rng(0)
    values = [0.1, 10.0, 1e-3, 1 / 3, 2.0**0.5, 1.0 + 2**-8 + 2**-30, 1.0 + 2**-8] + list(10 ** rng.uniform(-3, 1, 40))
    x = EVERY_BF16
    wide = x.float()

    def expect(op, value, opmath):
        return op(wide, float(elementwise.operand(value, torch.bfloat16, opmath))).to(torch.bfloat16)

    for value in values:
        for scalar in (value, torch.tensor(value, dtype=torch.float64), torch.tensor(value, dtype=torch.float32)):
            is_float = not isinstance(scalar, torch.Tensor)
            assert identical(x * scalar, expect(torch.mul, value, True))
            assert identical(x / scalar, expect(torch.div, value, True))
            assert identical(scalar * x, expect(torch.mul, value, is_float))
            assert identical(scalar - x, expect(lambda a, b: b - a, value, False))
            assert identical(x + scalar, expect(torch.add, value, False))
            assert torch.equal(x <= scalar, wide <= float(elementwise.operand(value, torch.bfloat16, False)))
            assert identical(x.float() * scalar, wide * float(elementwise.operand(value, torch.float32, True)))


def tabulated_derivatives():
    """(name, a bfloat16 activation surrogate that is a table lookup), for each method that has one, SwishSign's and
    ReSTE's in the scalar-tail variants whose tails round otherwise."""
    reste_tail = bnnbench.get_method("reste", o_end=2.0, t=1.0 + 2**-7, interval=0.25)
    return [
        ("irnet", lambda x: bnnbench.get_method("irnet").activation_derivative(x, 0.3141)),
        ("fda", lambda x: bnnbench.get_method("fda").activation_derivative(x, 0.5)),
        ("reste", lambda x: bnnbench.get_method("reste").activation_derivative(x, 0.3141)),
        ("reste-o2", lambda x: reste_tail.activation_derivative(x, 1.0)),
        ("swish-sign", lambda x: swish_sign.swish_sign_derivative(x, 5.0)),
    ]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", [name for name, _ in tabulated_derivatives()])
def test_a_looked_up_surrogate_takes_the_gradient_into_its_pass(name, threads, monkeypatch):
    """surrogate_sign's bfloat16 backward with a derivative that is a table lookup multiplies the gradient in the
    lookup's pass (no separate lookup, no torch product): torch's grad * derivative(x), bit for bit, on every
    bfloat16 value in the vectorised body and in each thread's scalar tail, with NaN, infinite and zero gradients."""
    derivative = dict(tabulated_derivatives())[name]
    generator = torch.Generator().manual_seed(7)
    filler = EVERY_BF16[1000:1064]
    sizes = [torch.cat([filler, chunk, filler[:n]]) for n, chunk in zip((0, 5, 63), EVERY_BF16.split(21_846))]
    cases = sizes + [EVERY_BF16.repeat(2)[: 2 * elementwise.REDUCTION_GRAIN + 37]]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x in cases:
            grad = (4 * torch.randn(x.shape, generator=generator)).to(torch.bfloat16)
            grad[:: 97] = float("nan")
            grad[1:: 89] = float("inf")
            grad[2:: 83] = 0.0
            leaf = x.clone().requires_grad_()
            lookups = []
            gather = elementwise.look_up
            with monkeypatch.context() as patch:
                patch.setattr(elementwise, "look_up", lambda *a: (lookups.append(1), gather(*a))[1])
                (fast,) = torch.autograd.grad(bnnbench.surrogate_sign(leaf, derivative), leaf, grad)
            expected = grad * reference(derivative, x, monkeypatch)
            assert identical(fast, expected), (name, x.numel())
            assert lookups == [], "the derivative was looked up in a pass of its own"
    finally:
        torch.set_num_threads(previous)


def tanh_of(x: torch.Tensor) -> torch.Tensor:
    """tanh(x), looked up where the kernels cover x."""
    looked_up = elementwise.tabulated(torch.tanh, x)
    return torch.tanh(x) if looked_up is None else looked_up


@pytest.mark.parametrize(
    "derivative",
    [
        lambda x: 2 * tanh_of(x),  # the lookup an intermediate
        lambda x: tanh_of(x).mul_(3),  # the lookup changed in place
        lambda x: tanh_of(x).view(x.shape),  # a view of it
        lambda x: tanh_of(x * 1) + tanh_of(x),  # of another x first
    ],
    ids=["intermediate", "in-place", "view", "other-x"],
)
def test_a_gradient_taken_into_a_lookup_never_changes_what_the_derivative_computes(derivative, monkeypatch):
    """Where the lookup of x is not what the derivative returns, unchanged, the backward computes the derivative
    again without the gradient and multiplies: torch's grad * derivative(x) in every case."""
    x = EVERY_BF16[30_000:40_000].clone()
    x = x[~x.isnan()]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    leaf = x.clone().requires_grad_()
    (fast,) = torch.autograd.grad(bnnbench.surrogate_sign(leaf, derivative), leaf, grad)
    assert identical(fast, grad * reference(derivative, x, monkeypatch))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "name, dtype",
    [(name, torch.float32) for name, _ in tabulated_derivatives()]
    + [(name, torch.bfloat16) for name in ("reste", "reste-o2", "swish-sign")],  # IR-Net's, FDA's: a lookup or torch's
    ids=lambda v: {torch.float32: "fp32", torch.bfloat16: "bf16-no-tables"}.get(v, v),
)
def test_a_surrogate_ending_in_a_kernel_takes_the_gradient_into_its_last_pass(name, dtype, threads, monkeypatch):
    """surrogate_sign's backward with a derivative whose last pass is a kernel (``apply(final=True)``: float32,
    and bfloat16 where no table covers the formula) multiplies the gradient in that pass, the derivative
    evaluated once and no torch product: torch's grad * derivative(x), bit for bit, on edge values, every
    bfloat16 value and normals, with NaN, infinite and zero gradients."""
    from bnnbench import functional

    derivative = dict(tabulated_derivatives())[name]
    generator = torch.Generator().manual_seed(9)
    monkeypatch.setattr(omp, "PARALLEL_WORK", 1)  # the kernels split even these between the threads
    if dtype == torch.bfloat16:
        monkeypatch.setattr(elementwise, "tabulated", lambda *a: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x in inputs(dtype)[:4]:
            grad = torch.empty_like(x).copy_(4 * torch.randn(x.shape, generator=generator))  # x's layout
            in_memory_order = grad.view(-1) if grad.is_contiguous() else grad.permute(0, 2, 3, 1).view(-1)
            in_memory_order[::97], in_memory_order[1::89], in_memory_order[2::83] = float("nan"), float("inf"), 0.0
            leaf = x.clone().requires_grad_()
            products, evaluations = [], []
            times, surrogate = elementwise.Kernel.times_gradient, functional._surrogate
            with monkeypatch.context() as patch:
                patch.setattr(elementwise.Kernel, "times_gradient", lambda self: (products.append(self), times(self))[1])
                patch.setattr(functional, "_surrogate", lambda *a: (evaluations.append(1), surrogate(*a))[1])
                (fast,) = torch.autograd.grad(bnnbench.surrogate_sign(leaf, derivative), leaf, grad)
            assert identical(fast, grad * reference(derivative, x, monkeypatch)), (name, x.shape)
            assert len(products) == 1 and len(evaluations) == 1, "the gradient was not multiplied in the derivative's last pass"
    finally:
        torch.set_num_threads(previous)


def _square(v: np.float32) -> np.float32:
    return r(v * v)


SQUARE = elementwise.Kernel("square", _square)


def squared(x: torch.Tensor) -> torch.Tensor:
    """x * x as a derivative's last kernel (torch's product where the kernels do not cover x)."""
    value = elementwise.apply(SQUARE, x, final=True)
    return x * x if value is None else value


def squared_again_in_place(s: torch.Tensor) -> torch.Tensor:
    """s * s written over s by a kernel (not a final one), or by torch."""
    if elementwise.apply(SQUARE, s, out=(s,)) is None:
        s.mul_(s)
    return s


@pytest.mark.parametrize(
    "derivative",
    [
        lambda x: 3 * squared(x),  # the kernel's value an intermediate
        lambda x: squared(x).mul_(3),  # changed in place
        lambda x: squared(x).view(x.shape),  # a view of it
        lambda x: squared(x * 1) + squared(x),  # two final kernels
        lambda x: squared(squared(x)),  # one final kernel's value the next one's input
        lambda x: squared_again_in_place(squared(x)),  # overwritten by a kernel, in place
    ],
    ids=["intermediate", "in-place", "view", "two", "nested", "kernel-in-place"],
)
def test_a_gradient_taken_into_a_final_kernel_never_changes_what_the_derivative_computes(derivative, monkeypatch):
    """Where a final kernel's value is not what the derivative returns, unchanged, the backward computes the
    derivative again without the gradient and multiplies: torch's grad * derivative(x) in every case."""
    x = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(10))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    leaf = x.clone().requires_grad_()
    (fast,) = torch.autograd.grad(bnnbench.surrogate_sign(leaf, derivative), leaf, grad)
    assert identical(fast, grad * reference(derivative, x, monkeypatch))


@pytest.mark.parametrize("n", [0, 9, 18])
def test_fdas_recurrence_with_fused_fp32_formulas_is_the_series_within_float32_rounding(n, threads):
    """--fp32-formulas fused: FDA's float32 series by the cosines' recurrence, as near the float64 series as torch's
    formula (within 2x its error), zero outside [-1, 1] and NaN where torch's float32 formula is (NaN or infinite x, an evaluated
    term's argument overflowing), the same on 1 and 2 threads; an omega above RECURRENCE_OMEGA keeps torch's cosines; torch's formulas (the default) never take it."""
    from bnnbench.methods import fda

    x = torch.randn(3, 5, 33, 31, generator=torch.Generator().manual_seed(n)) * 0.8
    x.view(-1)[:9] = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -7.0, 3e38, float("inf"), float("nan")])
    want = fda._fourier(x.double(), 0.1, n)
    torchs = fda.fourier_sign_derivative(x, 0.1, n, 18)
    results = []
    for count in (1, 2):
        threads(count)
        with chosen_formulas(fp32="fused"):
            results.append(fda.fourier_sign_derivative(x, 0.1, n, 18))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0, equal_nan=True)  # bit for bit, NaN as NaN
    got = results[0]
    assert torch.equal(got.isnan(), torchs.isnan())  # (3e38: 37 omega x overflows in float32, not in float64)
    finite = ~torchs.isnan()
    assert torch.all(got[finite & (x.abs() > 1)] == 0)
    error = lambda v: ((v.double() - want)[finite].norm() / want[finite].norm()).item()  # noqa: E731
    assert error(got) <= 2 * error(torchs) + 1e-8, (error(got), error(torchs))
    assert not torch.equal(got, torchs)  # the recurrence ran
    assert fda._fourier_recurrence(x, 1.5, n) is None and fda._fourier_recurrence(x.double(), 0.1, n) is None


def test_a_surrogate_evaluated_in_the_backward_takes_the_forwards_formulas(monkeypatch):
    """The backward runs outside the forward's ``formulas`` context (a training loop's loss.backward()); the
    surrogate, evaluated there, computes with the forward's choice: FDA's recurrence under fused fp32 formulas, its
    gradient multiplied into its pass (no separate product), within rounding of torch's formula's gradient."""
    from bnnbench.methods import fda

    calls = []
    recurrence = fda._fourier_recurrence
    monkeypatch.setattr(fda, "_fourier_recurrence", lambda *a: calls.append(1) or recurrence(*a))
    method = bnnbench.get_method("fda")
    x, grad = torch.randn(4, 8, 6, 6) * 0.6, torch.randn(4, 8, 6, 6)
    results = {}
    for chosen in ("torch", "fused"):
        leaf = x.clone().requires_grad_(True)
        with chosen_formulas(fp32=chosen):
            out = method.activation(leaf, progress=0.5)
        out.backward(grad)
        results[chosen] = leaf.grad
        assert len(calls) == (chosen == "fused")
    torch.testing.assert_close(results["fused"], results["torch"], rtol=1e-5, atol=1e-6)


@njit
def _exp_and_pow_of(z, a, q, exps, powers):
    for i in range(z.size):
        exps[i] = elementwise.exp_float32(z[i])
    for i in range(a.size):
        powers[i] = elementwise.pow_float32(a[i], q)


def test_the_float32_exp_and_pow_are_within_two_ulps():
    """The fused fp32 formulas' exp (SwishSign) and pow (ReSTE): exp within 2 float32 ulps of float64's over its
    range (0 below -87 and infinity above 88.3, NaN at NaN), a^q within 4 + |q log2 a| (the rounding of the power's
    base-2 logarithm, carried into the power)."""
    z = np.concatenate([np.linspace(-87, 88.3, 200001, dtype=np.float32), np.array([0.0, -0.0, -1e-30, 1e-8], np.float32)])
    a = np.concatenate([np.geomspace(1e-3, 1e3, 100001).astype(np.float32), np.array([0.1, 1.0, 1.5, 2.0 ** -20], np.float32)])
    specials = np.array([-88.0, -np.inf, 89.0, np.inf, np.nan], np.float32)
    for q in (-2.0 / 3.0, -0.41, 0.0, 0.5, 1.7):
        exps, powers = np.empty(z.size + specials.size, np.float32), np.empty_like(a)
        _exp_and_pow_of(np.concatenate([z, specials]), a, np.float32(q), exps, powers)
        allowed = 4 + np.abs(np.float64(np.float32(q)) * np.log2(a.astype(np.float64)))
        for got, want, bound in ((exps[: z.size], np.exp(z.astype(np.float64)), 2.0), (powers, a.astype(np.float64) ** np.float64(np.float32(q)), allowed)):
            ulps = np.abs(got - want) / np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
            assert np.all(ulps <= bound), (q, (ulps - bound).max())
        assert exps[z.size] == 0 and exps[z.size + 1] == 0 and np.isinf(exps[z.size + 2]) and np.isinf(exps[z.size + 3]) and np.isnan(exps[-1])


@pytest.mark.parametrize("name", ["swish-sign", "reste"])
def test_swish_sign_and_reste_with_fused_fp32_formulas_are_torchs_within_a_few_ulps(name, threads):
    """--fp32-formulas fused: SwishSign's derivative from one exponential and ReSTE's estimator in one pass: the
    torch formula's values within a few float32 ulps (where it is not near a zero of the value: SwishSign's numerator
    changes sign at |beta x| = 2.4), zeros and NaNs where it has them, on 1 and 2 threads, the gradient multiplied
    into the pass; the defaults (torch's formulas) never take them."""
    method = bnnbench.get_method(name)
    x = torch.randn(4, 8, 17, 19, generator=torch.Generator().manual_seed(3)) * 0.8
    x.view(-1)[:10] = torch.tensor([0.0, -0.0, 0.1, -1.0, 1.5, 1.6, -30.0, float("inf"), float("-inf"), float("nan")])
    grad = torch.randn_like(x)
    differed = []
    for progress in (0.0, 0.6, torch.tensor(1.0, dtype=torch.float64)):
        want = method.activation_derivative(x, progress)
        results = []
        for count in (1, 2):
            threads(count)
            with chosen_formulas(fp32="fused"):
                results.append(method.activation_derivative(x, progress))
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0, equal_nan=True)
        got = results[0]
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got == 0, want == 0)
        usable = torch.isfinite(want) & (want != 0) & ((5.0 * x).abs() - 2.4).abs().gt(0.1)
        ulps = (got - want)[usable].abs() / (torch.finfo(torch.float32).eps * want[usable].abs())
        assert ulps.max() <= 64, ulps.max()
        differed.append(not torch.equal(got[usable], want[usable]))
        leaf = x.clone().requires_grad_(True)
        with chosen_formulas(fp32="fused"):
            out = method.activation(leaf, progress=progress)
        out.backward(grad)
        torch.testing.assert_close(leaf.grad, grad * got, rtol=0, atol=0, equal_nan=True)
    assert any(differed)  # they ran (ReSTE at p = 0, o = 1, is exactly the STE's 1 either way)


def test_irnets_ede_with_fused_fp32_formulas_is_the_float64_value_within_a_few_ulps(threads):
    """--fp32-formulas fused: IR-Net's EDE as k t 4e / (1 + e)^2, e = exp(-2|t x|), in one pass: within 4 + 2|t x|
    float32 ulps of k t sech^2(t x) in float64 wherever that is normal (torch's float32 1 - tanh^2 cancels to 0 or to few
    correct digits where tanh nears 1: the fused value is the nearer), NaN where torch's is, on 1 and 2 threads."""
    method = bnnbench.get_method("irnet")
    x = torch.randn(4, 8, 17, 19, generator=torch.Generator().manual_seed(4)) * 0.8
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, 3.0, -40.0, float("inf"), float("nan")])
    for progress in (0.0, 0.5, torch.tensor(1.0, dtype=torch.float64)):
        k, t = float(method.k(progress)), float(method.t(progress))
        want = k * t / torch.cosh(t * x.double()) ** 2  # sech^2 in float64 (its 1 - tanh^2 cancels too, from |t x| ~ 18)
        torchs = method.activation_derivative(x, progress)
        results = []
        for count in (1, 2):
            threads(count)
            with chosen_formulas(fp32="fused"):
                results.append(method.activation_derivative(x, progress))
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0, equal_nan=True)
        got = results[0]
        assert torch.equal(got.isnan(), torchs.isnan())
        normal = torch.isfinite(want) & (want.abs() > 1e-30)
        ulps = lambda v: (v.double() - want)[normal].abs() / (torch.finfo(torch.float32).eps * want[normal].abs())  # noqa: E731
        bound = 4 + 2 * (t * x.double()).abs()[normal]  # exp's argument -2|t x| rounds: its error carries into e
        assert torch.all(ulps(got) <= bound) and ulps(got).max() <= ulps(torchs).max()
