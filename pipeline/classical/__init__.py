"""Classical reconstruction in one place: FBP/FDK, SENSE, TV and ``Aᴴy``, and their parameters.

What preprocess, reconstruct, losses, models and benchmarks call; the kernels stay in the
operator library (:mod:`operators3d.ct` ``fbp``/``fdk``/``filter_rows``, :func:`operators3d.sense_cg`,
:mod:`operators3d.tv`).

* :mod:`.slab` — a slab's measurements and operator to an image: :func:`reconstruct_slab`
  (``adjoint``, ``fbp``, ``sense``, ``tv`` with their parameters), :func:`fbp_slab`,
  :func:`n2i_slab`, :func:`sense_slab`, and cone-beam FDK by blocks of detector rows
  (:func:`fdk_filtered`, :func:`fdk_backproject`).
* :mod:`.tv` — the TV problem of a scan (:func:`tv_problem`) and one slab's solve
  (:func:`tv_reconstruct`).
* :mod:`.select` — the reference-free choice of the parameters on calibration blocks
  (:func:`select_fbp`, :func:`select_sense`, :func:`select_tv`; ``docs/classical.md``).
* :mod:`.auto` — a scan's method with its parameters given or calibrated (``"auto"``):
  :class:`AutoClassical`, what ``recon3d reconstruct`` and the training's validation baseline run.
* :mod:`.baseline` — the classical estimate of any operator, restricted ones included, for
  models and losses: :func:`filtered_backprojection` (differentiable FBP/FDK),
  :func:`clipped_fbp` (FBP of a scan read through a clipping detector) and
  :func:`classical_reconstruction`.
"""

from . import auto, baseline, select, slab, tv
from .auto import AUTO, AutoClassical
from .baseline import (CLIPPED_FBP_ITERATIONS, CLIPPED_FBP_STEP, classical_reconstruction, clip_levels_of, clipped_fbp,
                       filtered_backprojection)
from .select import (
    CALIBRATION_VERSION,
    FBP_CUTOFFS,
    FBP_WINDOWS,
    SENSE_ITERATIONS,
    SENSE_WEIGHTS,
    TV_ITERATIONS,
    CalibrationData,
    calibration_blocks,
    calibration_data,
    measurement_variance,
    select_fbp,
    select_sense,
    select_tv,
)
from .slab import METHODS, fbp_slab, fdk_backproject, fdk_filtered, n2i_slab, reconstruct_slab, sense_slab
from .tv import TVProblem, tv_problem, tv_reconstruct

__all__ = [*slab.__all__, *tv.__all__, *select.__all__, *baseline.__all__, *auto.__all__]
