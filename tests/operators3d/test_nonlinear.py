"""Non-linear forward models ``y = g(A x)`` (operators3d.nonlinear): values, Jacobians in
float64 (dot tests, finite differences), autograd == vjp, saved tensors, precision and errors."""

from __future__ import annotations

import math

import pytest
import torch

from operators3d import Clip, Identity, LinearOperator, ParallelBeamCT, Quantize, Sign, nonlinear_from_dict
from operators3d.nonlinear import NonLinearForward, quantize_values


class Dense(LinearOperator):
    """A dense real matrix acting on the last dimension (a generic ``A`` for the tests)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__((matrix.shape[1],), (matrix.shape[0],), domain_complex=False, range_complex=False)
        self.register_buffer("matrix", matrix)

    def _forward(self, x):
        return x @ self.matrix.T

    def _adjoint(self, y):
        return y @ self.matrix


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense(m: int = 40, n: int = 12) -> Dense:
    return Dense(torch.randn(m, n, dtype=torch.float64, generator=_gen(0)))


def _ct() -> ParallelBeamCT:
    return ParallelBeamCT(volume_shape=(2, 8, 8), angles=torch.linspace(0, math.pi, 6)[:-1]).double()


def _point(op: LinearOperator, seed: int = 1, batch: tuple[int, ...] = ()) -> torch.Tensor:
    return torch.randn(batch + op.domain_shape, dtype=torch.float64, generator=_gen(seed))


# Bounds are set from the measurements' spread so that every model sees entries on both sides
# of its kinks (a dot test where g' is all ones or all zeros would test A alone).
def _models(op: LinearOperator) -> dict[str, NonLinearForward]:
    z = op(_point(op))
    q1, q3 = (float(torch.quantile(z.flatten(), p)) for p in (0.25, 0.75))
    return {
        "clip": Clip(op, q1, q3),
        "clip_low_only": Clip(op, low=q1),
        "clip_high_only": Clip(op, high=q3),
        "clip_tensor_bounds": Clip(op, low=torch.full(op.range_shape[-1:], q1, dtype=torch.float64),
                                   high=q3),
        "quantize_3bit": Quantize(op, 3, q1, q3),
        "quantize_1bit": Quantize(op, 1, q1, q3),
        "sign": Sign(op, threshold=float(z.median()), width=(q3 - q1) / 2),
        "sign_tensor_threshold": Sign(op, threshold=torch.linspace(q1, q3, op.range_shape[-1], dtype=torch.float64),
                                      width=(q3 - q1) / 4),
        "sign_dither": Sign(op, threshold=float(z.median()), width=(q3 - q1) / 4,
                            dither={"amplitude": q3 - q1, "seed": 7}),
    }


OPS = {"dense": _dense, "parallel_ct": _ct}
CASES = [(o, m) for o in OPS for m in _models(OPS[o]())]


def _case(op_name: str, model_name: str) -> NonLinearForward:
    return _models(OPS[op_name]())[model_name]


@pytest.mark.parametrize(("op_name", "model_name"), CASES)
@pytest.mark.parametrize("batch", [(), (2,)])
def test_dot_test_jvp_vjp_float64(op_name, model_name, batch):
    """``⟨J(x) v, w⟩ = ⟨v, J(x)ᵀ w⟩`` at a random point (the surrogate's J where one is used)."""
    model = _case(op_name, model_name)
    x = _point(model.linear_part, 1, batch)
    v = _point(model.linear_part, 2, batch)
    w = torch.randn(batch + model.range_shape, dtype=torch.float64, generator=_gen(3))
    deriv = model.derivative(x)
    assert 0 < int((deriv != 0).sum()) < deriv.numel(), "the point must straddle the kinks"
    lhs = torch.vdot(model.jvp(x, v).flatten(), w.flatten())
    rhs = torch.vdot(v.flatten(), model.vjp(x, w).flatten())
    assert abs(float(lhs - rhs)) <= 1e-12 * max(abs(float(lhs)), abs(float(rhs)))
    # and J is diag(g') A: against the operator applied by hand
    torch.testing.assert_close(model.jvp(x, v), deriv * model.linear_part(v), rtol=1e-12, atol=0)


@pytest.mark.parametrize("op_name", list(OPS))
def test_clip_jvp_matches_finite_differences_away_from_the_kinks(op_name):
    model = _case(op_name, "clip")
    x, v = _point(model.linear_part, 1), _point(model.linear_part, 2)
    z, av = model.linear_part(x), model.linear_part(v)
    eps = 1e-6
    # no entry crosses a kink between x - eps v and x + eps v: the central difference is exact
    margin = torch.minimum((z - model.low).abs(), (z - model.high).abs())
    assert bool((margin > 10 * eps * av.abs()).all())
    fd = (model(x + eps * v) - model(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(model.jvp(x, v), fd, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(model(x), z.clamp(model.low, model.high))


@pytest.mark.parametrize(("name", "surrogate"), [
    ("quantize_3bit", lambda m, z: z.clamp(m.lo, m.hi)),
    ("sign", lambda m, z: ((z - m.threshold) / m.width).clamp(-1, 1)),
    ("sign_dither", lambda m, z: ((z - m.threshold) / m.width).clamp(-1, 1)),
])
def test_straight_through_jvp_is_the_derivative_of_the_documented_surrogate(name, surrogate):
    model = _case("dense", name)
    x, v = _point(model.linear_part, 1), _point(model.linear_part, 2)
    eps = 1e-6
    fd = (surrogate(model, model.linear_part(x + eps * v)) - surrogate(model, model.linear_part(x - eps * v))) / (2 * eps)
    torch.testing.assert_close(model.jvp(x, v), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("op_name", "model_name"), CASES)
def test_autograd_gradient_is_the_vjp_and_saves_only_a_bool_mask(op_name, model_name):
    model = _case(op_name, model_name)
    x = _point(model.linear_part, 1).requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.bool, tuple(y.shape))]
    w = torch.randn(y.shape, dtype=torch.float64, generator=_gen(4))
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    torch.testing.assert_close(grad, model.vjp(x.detach(), w), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(y, model(x))


def test_clip_gradcheck_and_double_backward_away_from_the_kinks():
    model = Clip(_dense(10, 4), low=-0.5, high=0.5)
    x = _point(model.linear_part, 5)
    z = model.linear_part(x)
    assert bool(((z - 0.5).abs() > 1e-3).all() and ((z + 0.5).abs() > 1e-3).all())
    assert torch.autograd.gradcheck(model, (x.requires_grad_(),), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(model, (x,), eps=1e-6, atol=1e-8)


class Tanh(NonLinearForward):
    """A smooth ``g`` (not a detector model): the base class's real-derivative path."""

    def __init__(self, linear):
        super().__init__(linear)
        self._freeze()

    def _g(self, z):
        return torch.tanh(z)

    def _derivative(self, z):
        return 1 - torch.tanh(z) ** 2

    def to_dict(self):
        return {"model": "tanh"}


def test_a_smooth_nonlinearity_saves_its_derivative_and_matches_finite_differences():
    model = Tanh(_dense())
    x, v = _point(model.linear_part, 1, (2,)), _point(model.linear_part, 2, (2,))
    w = torch.randn((2,) + model.range_shape, dtype=torch.float64, generator=_gen(3))
    lhs, rhs = torch.vdot(model.jvp(x, v).flatten(), w.flatten()), torch.vdot(v.flatten(), model.vjp(x, w).flatten())
    assert abs(float(lhs - rhs)) <= 1e-12 * abs(float(lhs))
    eps = 1e-6
    torch.testing.assert_close(model.jvp(x, v), (model(x + eps * v) - model(x - eps * v)) / (2 * eps),
                               rtol=1e-6, atol=1e-8)
    xg = x.clone().requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(xg)
    assert [t.dtype for t in saved] == [torch.float64]
    (grad,) = torch.autograd.grad((y * w).sum(), xg)
    torch.testing.assert_close(grad, model.vjp(x, w), rtol=1e-12, atol=1e-12)


def test_clip_kink_convention_is_one_at_the_levels():
    op = Identity((4,))
    model = Clip(op, low=-1.0, high=1.0)
    x = torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert model.derivative(x.detach()).tolist() == [0.0, 1.0, 1.0, 0.0]


def test_quantize_values_levels_and_saturation():
    z = torch.linspace(-3, 3, 2001, dtype=torch.float64)
    y = Quantize(Identity((2001,)), 2, -1.0, 1.0)(z)
    levels = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0], dtype=torch.float64)
    assert torch.isclose(y[:, None], levels[None]).any(dim=1).all()
    assert set(torch.unique(y).tolist()) == set(torch.unique(quantize_values(levels, 2, -1.0, 1.0)).tolist())
    assert (y[z <= -1] == -1).all() and (y[z >= 1] == 1).all()
    # nearest level inside the range: the error is at most half a step
    inside = (z >= -1) & (z <= 1)
    assert float((y[inside] - z[inside]).abs().max()) <= (2 / 3) / 2 + 1e-12
    one_bit = Quantize(Identity((3,)), 1, 0.0, 4.0)(torch.tensor([1.9, 2.1, 10.0]))
    assert one_bit.tolist() == [0.0, 4.0, 4.0]


def test_sign_values_are_plus_minus_one_with_plus_at_the_threshold():
    y = Sign(Identity((4,)), threshold=0.5)(torch.tensor([-1.0, 0.5, 0.6, 0.0]))
    assert y.tolist() == [-1.0, 1.0, 1.0, -1.0]


@pytest.mark.parametrize("model_name", ["quantize_3bit", "sign"])
def test_zero_gradient_is_exact_and_saves_nothing(model_name):
    model = _case("dense", model_name)
    exact = nonlinear_from_dict({**model.to_dict(), "gradient": "zero"}, model.linear_part)
    x = _point(model.linear_part, 1).requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = exact(x)
    assert saved == []
    torch.testing.assert_close(y, model(x))  # same forward
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert not grad.any() and not exact.vjp(x.detach(), torch.ones_like(y)).any()
    assert not exact.jvp(x.detach(), torch.ones_like(x)).any()
    assert model.vjp(x.detach(), torch.ones_like(y)).any()  # the surrogate's is not zero


def test_to_dtype_round_trip_moves_the_linear_part_and_tensor_bounds():
    op = _ct()
    model = Clip(op, low=torch.zeros(op.range_shape[-1], dtype=torch.float64), high=2.0)
    x = _point(model.linear_part, 1)
    y64 = model(x)
    assert model.float() is model
    assert model.linear_part.reference_tensor().dtype == torch.float32 and model.low.dtype == torch.float32
    y32 = model(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, y64.float(), rtol=1e-5, atol=1e-5)
    model.to(torch.float64)
    assert model.low.dtype == torch.float64
    torch.testing.assert_close(model(x), y64)
    assert model.to("cpu").device == torch.device("cpu")
    # a float64 bound does not promote float32 data
    mixed = Clip(_ct().float(), low=torch.zeros(op.range_shape[-1], dtype=torch.float64))
    assert mixed(x.float()).dtype == torch.float32


def test_shapes_repr_and_dict_round_trip():
    op = _ct()
    for model in _models(op).values():
        assert model.domain_shape == op.domain_shape and model.range_shape == op.range_shape
        assert model.linear_part is op
        again = nonlinear_from_dict(model.to_dict(), op)
        assert type(again) is type(model) and again.to_dict() == model.to_dict()
        assert model.name in repr(model)
    record = {"model": "clip", "low": 0.5, "high": None, "saturation": 0.6, "fraction_at_low": 0.3}
    assert nonlinear_from_dict(record, op).to_dict() == {"model": "clip", "low": 0.5, "high": None}


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda op: Clip(op, 1.0, 1.0), ValueError, "low must be < high"),
    (lambda op: Clip(op, 2.0, 1.0), ValueError, "low must be < high"),
    (lambda op: Clip(op, torch.tensor([0.0, 3.0]), 1.0), ValueError, "low must be < high"),
    (lambda op: Clip(op), ValueError, "give low, high or both"),
    (lambda op: Clip(op, float("nan")), ValueError, "NaN"),
    (lambda op: Clip(op, "0"), TypeError, "real number"),
    (lambda op: Clip(op, torch.zeros(3)), ValueError, "does not broadcast"),
    (lambda op: Quantize(op, 0, 0.0, 1.0), ValueError, "bits must be between 1 and 32"),
    (lambda op: Quantize(op, 33, 0.0, 1.0), ValueError, "bits must be between 1 and 32"),
    (lambda op: Quantize(op, 2.5, 0.0, 1.0), TypeError, "whole number"),
    (lambda op: Quantize(op, 2, 1.0, 1.0), ValueError, "lo < hi"),
    (lambda op: Quantize(op, 2, 0.0, math.inf), ValueError, "finite"),
    (lambda op: Quantize(op, 2, 0.0, 1.0, gradient="ste"), ValueError, "gradient must be one of"),
    (lambda op: Sign(op, width=0.0), ValueError, "width must be finite and > 0"),
    (lambda op: Sign(op, threshold=math.inf), ValueError, "threshold must be finite"),
    (lambda op: Clip(Identity((2,), complex=True), torch.zeros(2)), TypeError, "complex range takes number bounds"),
    (lambda op: Clip(torch.eye(2), 0.0), TypeError, "must be a LinearOperator"),
    (lambda op: nonlinear_from_dict({"model": "gamma"}, op), ValueError, "'model' must be one of"),
    (lambda op: nonlinear_from_dict({"model": "quantize", "low": 0, "high": 1}, op), ValueError, "needs 'bits'"),
])
def test_bad_parameters_are_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make(Identity((2,)))


def test_bad_inputs_are_clear_errors():
    model = Clip(Identity((2,)), 0.0, 1.0)
    with pytest.raises(TypeError, match="complex"):
        model(torch.ones(2, dtype=torch.complex128))
    with pytest.raises(ValueError, match="trailing shape"):
        model(torch.ones(3))
    with pytest.raises(ValueError, match="v must have the shape of x"):
        model.jvp(torch.ones(2), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"w must have the shape of forward\(x\)"):
        model.vjp(torch.ones(2), torch.ones(3))
    with pytest.raises(AttributeError, match="immutable"):
        model.low = -1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_models_move_to_cuda_with_their_bounds():
    op = _ct()
    model = Clip(op, low=torch.zeros(op.range_shape[-1], dtype=torch.float64), high=2.0)
    x = _point(op, 1)
    w = torch.randn(op.range_shape, dtype=torch.float64, generator=_gen(3))
    y, g = model(x), model.vjp(x, w)
    model.to("cuda")
    assert model.low.is_cuda and model.device.type == "cuda"
    xc = x.cuda().requires_grad_()
    (gc,) = torch.autograd.grad((model(xc) * w.cuda()).sum(), xc)
    torch.testing.assert_close(model(x.cuda()).cpu(), y)
    torch.testing.assert_close(gc.cpu(), g)


# ----------------------------------------------------------------------------- complex ranges (MRI)
def _mri():
    from operators3d import MultiCoilMRI, poisson_disc_mask, simulate_coil_maps

    shape = (2, 12, 10)
    mask = poisson_disc_mask(shape[1:], 2.0, calibration=4, generator=_gen(5))
    return MultiCoilMRI(mask=mask, coil_maps=simulate_coil_maps(3, shape)).to(torch.complex128)


def _complex_point(op, seed):
    g = _gen(seed)
    return torch.complex(torch.randn(op.domain_shape, dtype=torch.float64, generator=g),
                         torch.randn(op.domain_shape, dtype=torch.float64, generator=g))


@pytest.mark.parametrize("kind", ["sign", "sign_dither", "clip", "quantize"])
def test_complex_ranges_act_on_real_and_imaginary_parts_and_keep_unmeasured_entries_zero(kind):
    op = _mri()
    x, v = _complex_point(op, 1), _complex_point(op, 2)
    z = op(x)
    measured = op.measurement_mask().expand(op.range_shape)
    spread = float(torch.view_as_real(z)[measured].abs().median())
    model = {"sign": lambda: Sign(op, 0.0, width=spread),
             "sign_dither": lambda: Sign(op, 0.0, width=spread / 2, dither={"amplitude": 2 * spread, "seed": 3}),
             "clip": lambda: Clip(op, -spread, spread),
             "quantize": lambda: Quantize(op, 2, -spread, spread)}[kind]()
    y = model(x)
    parts = torch.view_as_real(z)
    g = {"sign": lambda t: torch.where(t >= 0, 1.0, -1.0).to(t.dtype),
         "sign_dither": lambda t: torch.where(t >= model.threshold, 1.0, -1.0).to(t.dtype),
         "clip": lambda t: t.clamp(-spread, spread),
         "quantize": lambda t: model._g(t)}[kind]
    torch.testing.assert_close(torch.view_as_real(y)[measured], g(parts)[measured])
    assert bool((y[~measured] == 0).all())  # sign(0) would read 1 + 1i: not a measurement
    # the Jacobian's dot test with the real inner product, and its trailing (real, imaginary) axis
    w = _complex_point_range(op, 3)
    deriv = model.derivative(x)
    assert deriv.shape == (*op.range_shape, 2) and bool((deriv[~measured] == 0).all())
    lhs = torch.vdot(torch.view_as_real(model.jvp(x, v)).flatten(), torch.view_as_real(w).flatten())
    rhs = torch.vdot(torch.view_as_real(v).flatten(), torch.view_as_real(model.vjp(x, w)).flatten())
    assert abs(float(lhs - rhs)) <= 1e-12 * max(abs(float(lhs)), abs(float(rhs)), 1e-30)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((model(xg) * w.conj()).real.sum(), xg)
    torch.testing.assert_close(grad, model.vjp(x, w), rtol=1e-12, atol=1e-12)


def _complex_point_range(op, seed):
    g = _gen(seed)
    return torch.complex(torch.randn(op.range_shape, dtype=torch.float64, generator=g),
                         torch.randn(op.range_shape, dtype=torch.float64, generator=g))


def test_dithered_threshold_is_per_part_seeded_and_the_same_for_every_d_slab():
    """The dither of a complex range ``(C, D, kH, kW)``: one ``τ`` per coil, k-space point and
    part, uniform on ``[−Δ, Δ)``, rebuilt from the seed alone, the same for any slab depth."""
    from operators3d.nonlinear import dither_shape, dither_threshold

    op = _mri()
    model = Sign(op, 0.25, width=0.1, dither={"amplitude": 2.0, "seed": 11})
    tau = model.threshold
    assert tau.shape == dither_shape(op.range_shape, True) == (3, 1, 12, 10, 2)
    u = tau - 0.25
    assert float(u.min()) >= -2.0 and float(u.max()) < 2.0 and float(u.std()) > 0.9  # U[−2, 2): σ = 1.15
    torch.testing.assert_close(dither_threshold((3, 7, 12, 10), True, 2.0, 11), u, rtol=0, atol=0)
    assert not torch.equal(dither_threshold((3, 7, 12, 10), True, 2.0, 12), u)
    # the record is small and rebuilds the same model (the same τ)
    record = model.to_dict()
    assert record == {"model": "sign", "threshold": 0.25, "dither": {"amplitude": 2.0, "seed": 11},
                      "width": 0.1, "gradient": "straight_through"}
    again = nonlinear_from_dict(record, op)
    assert torch.equal(again.threshold, tau) and again.to_dict() == record
    # the bits are taken about τ, per part
    x = _complex_point(op, 1)
    parts = torch.view_as_real(op(x))
    measured = op.measurement_mask().expand(op.range_shape)
    torch.testing.assert_close(torch.view_as_real(model(x))[measured],
                               torch.where(parts >= tau, 1.0, -1.0).to(parts.dtype)[measured])
    # a tensor threshold is stored as nested lists and comes back
    tensor = Sign(op, torch.full((12, 10, 2), 0.5, dtype=torch.float64), width=0.1)
    assert torch.equal(nonlinear_from_dict(tensor.to_dict(), op).threshold, tensor.threshold)


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda op: Sign(op, torch.zeros(5, dtype=torch.float64)), ValueError, "does not broadcast"),
    (lambda op: Sign(op, torch.zeros(2, dtype=torch.int64)), TypeError, "real floating tensor"),
    (lambda op: Sign(op, torch.tensor([0.0, math.nan], dtype=torch.float64)), ValueError, "finite everywhere"),
    (lambda op: Sign(op, torch.zeros(2, dtype=torch.float64), dither={"amplitude": 1.0, "seed": 0}),
     ValueError, "number threshold"),
    (lambda op: Sign(op, dither={"amplitude": 0.0, "seed": 0}), ValueError, "amplitude must be finite and > 0"),
    (lambda op: Sign(op, dither={"amplitude": 1.0}), ValueError, "dither must be"),
    (lambda op: Sign(op, dither={"amplitude": 1.0, "seed": 1.5}), TypeError, "seed must be a whole number"),
])
def test_tensor_and_dithered_thresholds_refuse_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make(_mri())
