"""The operator algebra: adjoints of nodes, shape errors, autograd, power method, CG."""

import pytest
import torch

from operators3d import (
    Composition,
    Diagonal,
    Identity,
    LinearOperator,
    MultiCoilMRI,
    Scaled,
    Sum,
    conjugate_gradient,
    op_norm,
)
from operators3d.testing import (
    assert_adjoint,
    assert_gradients,
    assert_no_saved_tensors,
    check_operator,
)

SHAPE = (5, 6, 7)


class MatrixOperator(LinearOperator):
    """A dense matrix acting on flattened trailing dims: an independent reference."""

    def __init__(self, matrix: torch.Tensor, domain_shape, range_shape, *, strict=True):
        kind = (matrix.is_complex() or None) if strict else None
        super().__init__(domain_shape, range_shape, domain_complex=kind, range_complex=kind)
        self.register_buffer("matrix", matrix)

    def _forward(self, x):
        lead = x.shape[: x.ndim - len(self.domain_shape)]
        flat = x.reshape(lead + (-1,))
        return (flat @ self.matrix.T).reshape(lead + self.range_shape)

    def _adjoint(self, y):
        lead = y.shape[: y.ndim - len(self.range_shape)]
        flat = y.reshape(lead + (-1,))
        return (flat @ self.matrix.conj()).reshape(lead + self.domain_shape)


def _matrix(m, n, seed, dtype=torch.complex128):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, dtype=dtype, generator=g)


@pytest.fixture
def ops():
    a = MatrixOperator(_matrix(12, 10, 0), (10,), (3, 4))
    b = MatrixOperator(_matrix(10, 7, 1), (7,), (10,))
    c = MatrixOperator(_matrix(10, 7, 2), (7,), (10,))
    return a, b, c


def test_matrix_reference_passes_battery(ops):
    for op in ops:
        check_operator(op, gradients=True)


def test_algebra_nodes_have_exact_adjoints(ops):
    a, b, c = ops
    for op in (a @ b, b + c, b - c, 2.5 * b, (1 - 2j) * b, -b, a @ (b + c) * 3, (a @ b).H @ a):
        check_operator(op)


def test_algebra_adjoints_are_structural(ops):
    a, b, c = ops
    comp = (a @ b).H
    assert isinstance(comp, Composition)
    assert comp.outer is b.H and comp.inner is a.H
    assert isinstance((b + c).H, Sum)
    scaled = ((2 + 1j) * b).H
    assert isinstance(scaled, Scaled) and scaled.scale == 2 - 1j
    for op in (a, a @ b, b + c, 3 * b, a.H):
        assert op.H.H is op


def test_applied_operators_are_freed_without_the_cycle_collector(ops):
    """No reference cycle op <-> op.H / op.normal_operator(): an operator and its buffers go
    as soon as the last reference does, not at the next cyclic GC."""
    import copy
    import gc
    import pickle
    import weakref

    a, b, _ = ops
    gc.disable()
    try:
        op = (2.0 * a) @ b
        x = torch.randn(2, 7, dtype=torch.complex128, requires_grad=True)
        op.adjoint(op(x)).abs().sum().backward()
        op.normal(x)
        refs = [weakref.ref(op), weakref.ref(op.H), weakref.ref(op.normal_operator())]
        del op
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
    adj = a.H
    assert adj.H is a and a.H is adj
    clone = copy.deepcopy(a)
    assert clone.H is not adj and clone.H.H is clone
    ones = torch.ones(3, 4, dtype=torch.complex128)
    assert torch.equal(pickle.loads(pickle.dumps(a)).H(ones), adj(ones))


def test_algebra_matches_dense_matrices(ops):
    a, b, c = ops
    x = torch.randn(2, 7, dtype=torch.complex128, generator=torch.Generator().manual_seed(5))
    dense = a.matrix @ (b.matrix + c.matrix) * (0.5 - 1j)
    got = (((0.5 - 1j) * (a @ (b + c))))(x)
    assert torch.allclose(got.reshape(2, -1), x @ dense.T, atol=1e-12)
    got_h = ((a @ b).H)(torch.ones(3, 4, dtype=torch.complex128))
    assert torch.allclose(got_h, (a.matrix @ b.matrix).conj().T @ torch.ones(12, dtype=torch.complex128))


def test_shape_errors_name_operator_and_shapes(ops):
    a, b, _ = ops
    with pytest.raises(ValueError, match=r"MatrixOperator.forward: expected trailing shape \(10,\)"):
        a(torch.zeros(9, dtype=torch.complex128))
    with pytest.raises(ValueError, match=r"adjoint: expected trailing shape \(3, 4\)"):
        a.adjoint(torch.zeros(4, 3, dtype=torch.complex128))
    with pytest.raises(ValueError, match="cannot compose"):
        b @ a
    with pytest.raises(ValueError, match="cannot add"):
        a + b
    with pytest.raises(TypeError, match="apply an operator"):
        a @ torch.zeros(10)
    with pytest.raises(TypeError, match="apply with A"):
        a * torch.zeros(10)


def test_dtype_errors():
    mask = torch.ones(6, 7, dtype=torch.bool)
    op = MultiCoilMRI(mask=mask, volume_shape=SHAPE)
    with pytest.raises(TypeError, match="MultiCoilMRI.forward: expected a complex tensor, got dtype torch.float32"):
        op(torch.zeros(SHAPE))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        op([1, 2, 3])


def test_backward_is_adjoint_and_saves_nothing(ops):
    a, b, _ = ops
    op = a @ b
    assert_no_saved_tensors(op)
    x = torch.randn(7, dtype=torch.complex128, requires_grad=True)
    g = torch.randn(3, 4, dtype=torch.complex128)
    y = op(x)
    (torch.vdot(y.reshape(-1), g.reshape(-1))).real.backward()
    # d Re<Ax, g> / d conj(x) convention of torch: grad = A^H g
    assert torch.allclose(x.grad, op.adjoint(g), atol=1e-12)


def test_gradcheck_through_custom_function(ops):
    a, b, _ = ops
    assert_gradients(a @ b)


def test_real_input_to_complex_operator_gets_real_gradient():
    m = MatrixOperator(_matrix(4, 3, 9), (3,), (4,), strict=False)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = m(x.to(torch.complex128))
    y.abs().pow(2).sum().backward()
    assert x.grad is not None and not x.grad.is_complex()


def test_identity_diagonal_and_repr():
    d = Diagonal(torch.randn(6, 7, dtype=torch.complex128), SHAPE)
    check_operator(d, gradients=True)
    check_operator(Identity(SHAPE, complex=True))
    assert repr(d) == "Diagonal((5, 6, 7) ← (5, 6, 7))"
    with pytest.raises(ValueError, match="do not broadcast"):
        Diagonal(torch.ones(4), SHAPE)


def test_buffers_move_with_to():
    d = Diagonal(torch.randn(6, 7, dtype=torch.complex64), SHAPE)
    d64 = d.to(torch.complex128)
    assert d64.weights.dtype == torch.complex128
    assert "weights" in dict(d.named_buffers())
    assert not list(d.parameters())


def test_op_norm_matches_svd(ops):
    a, b, _ = ops
    op = a @ b
    dense = a.matrix @ b.matrix
    expected = torch.linalg.matrix_norm(dense, ord=2).item()
    got = op_norm(op, num_iters=500, tol=1e-12, generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(expected, rel=1e-6)


def test_conjugate_gradient_solves_batched_systems(ops):
    _, b, _ = ops
    normal = b.normal_operator()
    g = torch.Generator().manual_seed(3)
    x_true = torch.randn(3, 7, dtype=torch.complex128, generator=g)
    rhs = normal(x_true)
    x = conjugate_gradient(normal, rhs, num_iters=50, tol=1e-12)
    assert torch.allclose(x, x_true, atol=1e-8)
    # damping: (N + λI) x = rhs
    lam = 0.3
    x = conjugate_gradient(normal, normal(x_true) + lam * x_true, damping=lam, tol=1e-12)
    assert torch.allclose(x, x_true, atol=1e-8)


def test_operators_are_not_mutated_by_calls(ops):
    a, b, _ = ops
    before = {k: v.clone() for k, v in a.state_dict().items()}
    x = torch.randn(10, dtype=torch.complex128)
    a(x)
    a.adjoint(a(x))
    a.normal(x)
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])


def test_operators_are_immutable_after_construction():
    op = MultiCoilMRI(mask=torch.ones(6, 7, dtype=torch.bool), volume_shape=SHAPE)
    with pytest.raises(AttributeError, match="MultiCoilMRI is immutable"):
        op.mask = torch.zeros(6, 7)
    with pytest.raises(AttributeError, match="immutable"):
        op.domain_shape = (1, 2, 3)
    op.eval()  # nn.Module's mode flag stays usable
    moved = op.to(torch.float64)  # .to() swaps buffers without attribute assignment
    assert moved is op


def test_to_dtype_changes_precision_and_keeps_complex_buffers():
    maps = torch.randn(2, *SHAPE, dtype=torch.complex64)
    op = MultiCoilMRI(mask=torch.rand(6, 7) > 0.5, coil_maps=maps)
    x = torch.randn(SHAPE, dtype=torch.complex128)
    ref = MultiCoilMRI(mask=op.mask, coil_maps=maps.to(torch.complex128))(x)
    op.to(torch.float64)
    assert op.coil_maps.dtype == torch.complex128 and op.mask.dtype == torch.bool
    assert torch.allclose(op(x), ref, atol=1e-12)
    op.float()
    assert op.coil_maps.dtype == torch.complex64
