"""Group actions on volumes, for equivariant imaging.

Equivariant imaging (Chen, Tachella & Davies, ICCV 2021) picks a group action ``T_g`` under
which the set of images is invariant and asks the reconstructor to commute with it:
``f(A T_g x, A) ≈ T_g f(A x, A)``. This package holds the actions: in-plane rotations by
multiples of 90° (:class:`Rotate90`) and by any angle (:class:`Rotate`), flips
(:class:`Reflect`), circular shifts (:class:`Shift`), the 24 proper rotations of the cube
(:class:`CubeRotation`), and compositions of them (:class:`ComposedAction`).

Conventions shared by every action:

- They act on the last three dims, read as ``(D, H, W)``; any leading dims (batch, channels)
  broadcast, so ``(B, D, H, W)`` and ``(B, C, D, H, W)`` both work, with no loop over the batch.
  Axes are named ``"D"``, ``"H"``, ``"W"`` (or given as ``-3``, ``-2``, ``-1``).
- Real and complex inputs, CPU and CUDA; plain torch ops, so autograd flows through them.
- One group element per call: every batch element gets the same transform. Draw one element
  per step (or call once per sub-batch) for batch-wise different transforms.
- Actions are immutable (frozen dataclasses: equal elements compare equal and hash alike).
  ``a.compose(b)`` (also ``a @ b``) is ``a ∘ b``: apply ``b`` first, then ``a``.
- Random elements come from a classmethod ``sample(*, generator=None, ...)`` that draws from
  the given :class:`torch.Generator` (the global RNG if ``None``), so a seeded generator gives
  the same element every time. ``exclude_identity=True`` (the default where the group is
  finite) never draws the identity, which would make an EI step contribute nothing.

Modules: :mod:`~operators3d.transforms.action` (the base class, composition and the shared
axis and sampling helpers), :mod:`~operators3d.transforms.lattice` (the exact actions that
permute voxels: :class:`Rotate90`, :class:`Reflect`, :class:`Shift`, :class:`CubeRotation`) and
:mod:`~operators3d.transforms.rotate` (:class:`Rotate`, interpolated).
"""

from .action import ComposedAction, GroupAction
from .lattice import CubeRotation, Reflect, Rotate90, Shift, cube_rotations
from .rotate import Rotate

__all__ = [
    "GroupAction",
    "ComposedAction",
    "Rotate90",
    "Rotate",
    "Reflect",
    "Shift",
    "CubeRotation",
    "cube_rotations",
]
