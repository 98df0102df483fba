"""Tests of the group actions in operators3d.transforms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from operators3d.transforms import (
    ComposedAction,
    CubeRotation,
    GroupAction,
    Reflect,
    Rotate,
    Rotate90,
    Shift,
    cube_rotations,
)

SHAPES = [(2, 5, 5, 5), (2, 3, 5, 5, 5)]
DTYPES = [torch.float64, torch.complex128]
PLANES = [("H", "W"), ("D", "H"), ("D", "W")]


def _volume(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=dtype, generator=g)


def _exact_actions() -> list[GroupAction]:
    actions: list[GroupAction] = []
    for plane in PLANES:
        actions += [Rotate90(k, plane=plane) for k in range(4)]
    actions += [Reflect(axes) for n in range(4) for axes in itertools.combinations("DHW", n)]
    actions += [Shift((0, 0, 0)), Shift((1, -2, 3)), Shift((7, 0, -11))]
    actions += list(cube_rotations())
    actions += [
        ComposedAction(Shift((1, 2, 0)), CubeRotation(7)),
        Rotate90(1) @ Reflect(("D",)),
        Rotate(math.pi / 2) @ Shift((0, 1, 1)),
    ]
    for k in range(4):
        actions.append(Rotate(k * math.pi / 2, plane=("H", "W")))
    return actions


EXACT = _exact_actions()


# ------------------------------------------------------------------------ inverses
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_is_exact_identity(shape, dtype):
    x = _volume(shape, dtype)
    for action in EXACT:
        y = action(x)
        assert y.shape == x.shape and y.dtype == x.dtype, action
        assert torch.equal(action.inverse()(y), x), action


def test_inverse_elements_compose_to_identity():
    x = _volume((1, 5, 5, 5), torch.float64)
    for action in EXACT:
        assert torch.equal(action.compose(action.inverse())(x), x), action
        assert torch.equal((action.inverse() @ action)(x), x), action


BLOBS = [(3.0, -5.0, 4.0, 1.0), (-6.0, 2.0, 5.0, 0.7), (1.0, 6.0, 3.5, -0.5)]  # (r, c, width, amp)


def _smooth_image(n: int) -> torch.Tensor:
    """A sum of wide Gaussian blobs on an (n, n) plane, negligible near the border."""
    c = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    r, s = torch.meshgrid(c, c, indexing="ij")
    img = torch.zeros(n, n, dtype=torch.float64)
    for a, b, w, amp in BLOBS:
        img += amp * torch.exp(-((r - a) ** 2 + (s - b) ** 2) / (2 * w**2))
    return img


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotate_inverse_is_near_identity_inside_disk(dtype):
    n = 33
    img = _smooth_image(n)
    x = img if not dtype.is_complex else torch.complex(img, 0.5 * img.flip(-1))
    x = x.expand(2, 3, n, n).clone()  # (B, D, H, W)
    c = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    disk = (c[:, None] ** 2 + c[None, :] ** 2) <= (0.4 * n) ** 2
    # Bilinear interpolation errs by at most (h²/8)(max|f_xx| + max|f_yy|) per pass (h = 1
    # voxel); each blob's second derivatives are at most amp / width². Two passes:
    tol = 2 * (1 / 8) * 2 * sum(abs(amp) / w**2 for _, _, w, amp in BLOBS)  # ≈ 0.066
    for angle in (0.3, -1.1, 2.5):
        rot = Rotate(angle)
        back = rot.inverse()(rot(x))
        parts = [(back.real, x.real, 1.0)]
        if dtype.is_complex:
            parts.append((back.imag, x.imag, 0.5))
        for b, ref, scale in parts:
            err = (b - ref).abs()[..., disk].max().item()
            assert err < scale * tol, (angle, err)
        assert not torch.equal(back, x)  # interpolation really happened
        # A wrong sense (rotating twice the same way) is far off: the tolerance means something.
        wrong = rot(rot(x))
        assert (wrong - x).abs()[..., disk].max().item() > 4 * tol


@pytest.mark.parametrize("k", range(4))
def test_rotate_matches_rotate90_sense(k):
    x = _volume((2, 3, 7, 7), torch.float64)
    near = Rotate(k * math.pi / 2 + 1e-7)(x)  # goes through grid_sample
    assert torch.allclose(near, Rotate90(k)(x), atol=1e-5)
    assert torch.equal(Rotate(k * math.pi / 2)(x), Rotate90(k)(x))


@pytest.mark.parametrize("plane", PLANES)
def test_rotate_other_planes_and_reversed_plane(plane):
    x = _volume((1, 6, 6, 6), torch.float64)
    assert torch.allclose(
        Rotate(math.pi / 2 + 1e-7, plane=plane)(x), Rotate90(1, plane=plane)(x), atol=1e-5
    )
    reversed_plane = plane[::-1]
    assert Rotate(0.4, plane=reversed_plane) == Rotate(-0.4, plane=plane)
    assert Rotate90(1, plane=reversed_plane) == Rotate90(3, plane=plane)
    dims = ("DHW".index(plane[1]) - 3, "DHW".index(plane[0]) - 3)
    assert torch.equal(Rotate90(1, plane=reversed_plane)(x), torch.rot90(x, 1, dims=dims))


def test_rotate_non_square_plane_keeps_shape():
    x = _volume((2, 3, 6, 9), torch.float32)
    for angle in (0.5, math.pi / 2, math.pi):
        assert Rotate(angle)(x).shape == x.shape
    assert torch.equal(Rotate(math.pi)(x), torch.flip(x, dims=(-2, -1)))
    # A quarter turn of a non-square plane is not a symmetry of the grid: corners are cut.
    y = Rotate(math.pi / 2)(torch.ones(1, 1, 6, 9))
    assert y.shape == (1, 1, 6, 9) and y[..., 0, 0].item() == 0.0


def test_rotate_complex_rotates_real_and_imaginary_parts():
    x = _volume((2, 4, 9, 9), torch.complex128)
    rot = Rotate(0.7)
    y = rot(x)
    assert torch.allclose(y.real, rot(x.real)) and torch.allclose(y.imag, rot(x.imag))


def test_rotate_compose_adds_angles():
    a, b = Rotate(0.2), Rotate(0.5, plane=("H", "W"))
    assert a.compose(b) == Rotate(0.7)
    assert isinstance(Rotate(0.2).compose(Rotate(0.2, plane=("D", "H"))), ComposedAction)


# ---------------------------------------------------------------- closed compositions
def test_same_type_compositions_are_closed_and_match_sequential_application():
    x = _volume((2, 5, 5, 5), torch.float64)
    pairs = [
        (Rotate90(1), Rotate90(2)),
        (Rotate90(3, plane=("D", "W")), Rotate90(3, plane=("W", "D"))),
        (Reflect(("H",)), Reflect(("H", "W"))),
        (Shift((1, 2, 3)), Shift((-4, 0, 2))),
    ]
    for a, b in pairs:
        ab = a.compose(b)
        assert type(ab) is type(a), (a, b)
        assert torch.equal(ab(x), a(b(x))), (a, b)
    assert Reflect(("H",)).compose(Reflect(("H",))) == Reflect(())
    assert Rotate90(1) @ Rotate90(3) == Rotate90(0)


def test_cube_rotations_are_24_distinct():
    rots = cube_rotations()
    assert len(rots) == 24 and rots[0] == CubeRotation(0)
    x = _volume((5, 5, 5), torch.float64)  # random, so no symmetry
    assert torch.equal(rots[0](x), x)
    outs = [r(x) for r in rots]
    for i, j in itertools.combinations(range(24), 2):
        assert not torch.equal(outs[i], outs[j]), (i, j)
    for r in rots:
        assert round(torch.linalg.det(r.matrix.double()).item()) == 1


def test_cube_rotations_are_closed_under_composition():
    rots = cube_rotations()
    x = _volume((1, 5, 5, 5), torch.float64)
    outs = {r.index: r(x) for r in rots}
    for a in rots:
        row = set()
        for b in rots:
            ab = a.compose(b)
            assert isinstance(ab, CubeRotation)
            assert torch.equal(ab(x), a(b(x))), (a, b)
            row.add(ab.index)
        assert row == set(range(24))  # a Latin-square group table
        assert torch.equal(a.inverse()(outs[a.index]), x)
        assert a.compose(a.inverse()) == CubeRotation(0)


def test_cube_rotations_contain_the_quarter_turns():
    x = _volume((1, 5, 5, 5), torch.float64)
    outs = [r(x) for r in cube_rotations()]
    for plane in PLANES:
        for k in range(4):
            y = Rotate90(k, plane=plane)(x)
            assert sum(torch.equal(y, o) for o in outs) == 1, (plane, k)


def test_cube_rotation_from_matrix_round_trip_and_errors():
    for r in cube_rotations():
        assert CubeRotation.from_matrix(r.matrix) == r
    with pytest.raises(ValueError, match="CubeRotation.from_matrix"):
        CubeRotation.from_matrix([[-1, 0, 0], [0, 1, 0], [0, 0, 1]])  # a reflection
    with pytest.raises(ValueError, match="CubeRotation"):
        CubeRotation(24)


# ------------------------------------------------------------------ shapes, grads, devices
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_are_the_transposed_action(shape, dtype):
    w = _volume(shape, dtype, seed=1)
    for action in [Rotate90(1), Reflect(("D", "W")), Shift((1, 2, -1)), CubeRotation(13)]:
        x = _volume(shape, dtype).requires_grad_(True)
        loss = (action(x) * w.conj()).real.sum()
        (grad,) = torch.autograd.grad(loss, x)
        # The actions are permutations, so the adjoint is the inverse.
        assert torch.allclose(grad, action.inverse()(w)), action


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotate_gradients(dtype):
    x = _volume((1, 2, 4, 5), dtype).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: Rotate(0.4)(v), (x,))
    x5 = _volume((2, 3, 2, 6, 6), dtype).requires_grad_(True)
    y = Rotate(1.0, plane=("D", "H"))(x5)
    assert y.shape == x5.shape
    (g,) = torch.autograd.grad(y.abs().sum(), x5)
    g_real = torch.view_as_real(g) if g.is_complex() else g
    assert torch.isfinite(g_real).all() and g.abs().sum() > 0


def test_errors_name_the_class():
    with pytest.raises(ValueError, match="Rotate90.*equal sizes"):
        Rotate90(1)(torch.zeros(1, 2, 3, 4))
    assert Rotate90(2)(torch.zeros(1, 2, 3, 4)).shape == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="CubeRotation.*shape"):
        CubeRotation(5)(torch.zeros(1, 4, 5, 6))
    with pytest.raises(ValueError, match="Rotate90.*axis"):
        Rotate90(1, plane=("H", "X"))
    with pytest.raises(ValueError, match="Reflect"):
        Reflect(("Q",))
    with pytest.raises(ValueError, match="Shift"):
        Shift((1, 2))
    with pytest.raises(ValueError, match="Shift"):
        Shift((1.5, 0, 0))
    with pytest.raises(ValueError, match=r"Rotate: .*\(D, H, W\)"):
        Rotate(0.1)(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="Rotate"):
        Rotate(0.1)(torch.zeros(1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="Rotate: interp"):
        Rotate(0.1, interp="cubic")
    with pytest.raises(TypeError, match="compose"):
        Shift((0, 0, 1)).compose(torch.zeros(3))


def test_actions_are_immutable():
    r = Rotate90(1)
    with pytest.raises(AttributeError):
        r.k = 2  # type: ignore[misc]


# -------------------------------------------------------------------------- random draws
def _draws(cls, seed, n=20, **kwargs):
    g = torch.Generator().manual_seed(seed)
    return [cls.sample(generator=g, **kwargs) for _ in range(n)]


def test_seeded_draws_are_deterministic_and_exclude_identity():
    shape = (2, 5, 6, 7)
    cases = [
        (Rotate90, {}),
        (Rotate, {"max_angle": 0.5}),
        (Reflect, {}),
        (Reflect, {"axes": ("D", "H", "W")}),
        (Shift, {"shape": shape}),
        (Shift, {"shape": shape, "axes": ("D",)}),
        (CubeRotation, {}),
    ]
    x = _volume((1, 5, 5, 5), torch.float64)
    for cls, kwargs in cases:
        first, again, other = (_draws(cls, s, **kwargs) for s in (3, 3, 4))
        assert first == again, cls
        assert first != other, cls
        for action in first:
            assert isinstance(action, cls)
            if cls is not Rotate and cls is not Shift:
                assert not torch.equal(action(x), x), action
    for action in _draws(Rotate, 0, n=100, max_angle=0.5):
        assert -0.5 <= action.angle <= 0.5
    for action in _draws(Shift, 0, n=100, shape=shape):
        assert action.shifts[0] == 0 and 0 <= action.shifts[1] < 6 and 0 <= action.shifts[2] < 7
        assert action.shifts != (0, 0, 0)


def test_draws_cover_the_finite_groups():
    assert {a.k for a in _draws(Rotate90, 0, n=60)} == {1, 2, 3}
    assert {a.k for a in _draws(Rotate90, 0, n=80, exclude_identity=False)} == {0, 1, 2, 3}
    assert {a.index for a in _draws(CubeRotation, 0, n=400)} == set(range(1, 24))
    assert len({a.axes for a in _draws(Reflect, 0, n=60, axes=("D", "H", "W"))}) == 7
    shifts = {a.shifts for a in _draws(Shift, 0, n=300, shape=(3, 3, 4), axes=("H", "W"))}
    assert len(shifts) == 11


def test_shift_sample_refuses_trivial_group():
    with pytest.raises(ValueError, match="Shift.sample"):
        Shift.sample(shape=(4, 1, 1), generator=torch.Generator().manual_seed(0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = _volume((2, 3, 8, 8, 8), torch.complex64)
    xc = x.cuda()
    for action in [Rotate90(1), Rotate(0.3), Reflect(("H",)), Shift((1, 2, 3)), CubeRotation(9)]:
        torch.testing.assert_close(action(xc).cpu(), action(x), atol=1e-5, rtol=1e-5)
    g = torch.Generator(device="cuda").manual_seed(0)
    assert isinstance(CubeRotation.sample(generator=g), CubeRotation)
