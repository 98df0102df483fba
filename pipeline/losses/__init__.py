"""Self-supervised and supervised losses with one contract.

``loss(x_hat, y, op, model) -> LossOutput(total, parts)``; splitting losses wrap the model once
with ``model = loss.adapt_model(model)``; losses combine with weights (:class:`WeightedSum`,
``a + b``, ``w * a``). Self-supervised losses never see a reference; :class:`SupervisedLoss`
takes ``reference=`` (simulated data only). Squared errors are averaged over measured entries,
a complex entry contributing ``|z|²``; for complex data a noise ``sigma`` is the standard
deviation of the real and of the imaginary part each. Formulas: ``METHODS.md``.

* :class:`MeasurementConsistencyLoss` — ``‖y − A x̂‖²/m``.
* :class:`EquivariantImagingLoss` — ``‖f(A T_g x̂ (+ n′)) − T_g x̂‖²/n_x`` (EI, robust EI);
  :func:`equivariant_imaging` (MC + EI) and :func:`robust_ei` (SURE + EI with fresh noise).
* :class:`SureGaussianLoss`, :class:`SurePoissonLoss` — SURE, PURE and PG-URE with a seeded
  Monte-Carlo divergence; SURE also with per-ray variances (CT transmission noise) and, for
  parallel-beam CT, of the image-domain error (``metric="image"``, GSURE).
* :class:`SplittingLoss` (any operator), :class:`SSDULoss` (MRI), :class:`Noise2InverseLoss`
  (CT angle subsets; other operators: entry subsets).
* :class:`SupervisedLoss` — MSE / L1 against a reference.

Example::

    from operators3d import Rotate90
    from pipeline.losses import EquivariantImagingLoss, MeasurementConsistencyLoss

    loss = MeasurementConsistencyLoss() + EquivariantImagingLoss(transform=Rotate90, seed=0)
    model = loss.adapt_model(model)
    x_hat = model(y, op)
    out = loss(x_hat, y, op, model)        # out.total.backward(); out.parts["ei"]
"""

from .base import (
    Loss,
    LossOutput,
    WeightedSum,
    residual_norms,
    squared_residual,
    step_generators,
)
from .consistency import MeasurementConsistencyLoss, SupervisedLoss
from .equivariant import EquivariantImagingLoss, equivariant_imaging, robust_ei
from .noise2inverse import Noise2InverseLoss, angle_subsets
from .splitting import Split, SplittingLoss, SplittingModel
from .ssdu import SSDULoss, calibration_size, ssdu_probabilities
from .sure import SureGaussianLoss, SurePoissonLoss

__all__ = [
    "Loss",
    "LossOutput",
    "WeightedSum",
    "MeasurementConsistencyLoss",
    "EquivariantImagingLoss",
    "equivariant_imaging",
    "robust_ei",
    "SureGaussianLoss",
    "SurePoissonLoss",
    "SplittingLoss",
    "SSDULoss",
    "Noise2InverseLoss",
    "SplittingModel",
    "Split",
    "SupervisedLoss",
    "angle_subsets",
    "calibration_size",
    "ssdu_probabilities",
    "step_generators",
    "residual_norms",
    "squared_residual",
]
