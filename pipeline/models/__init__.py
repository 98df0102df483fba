"""3D networks, reconstructors ``model(y, op) -> x_hat`` and memory-bounded tiled evaluation.

* :class:`UNet3D` — a 3D U-Net backbone on real channels ``(B, C, D, H, W)`` (receptive
  radius 9 / 23 / 51 voxels for 2 / 3 / 4 levels), optionally checkpointed per level
  (``checkpoint="level"``) or as a whole around nested level checkpoints
  (``checkpoint="network"``, for steps that run the network twice);
  :class:`DnCNN3D` — a plain convolutional denoiser (receptive radius ``depth · (k//2)``,
  5 by default), the usual backbone of unrolled networks.
* :class:`TiledBackbone` — runs any backbone on overlapping tiles with a blending window and
  non-reentrant activation checkpointing per tile; equal to the untiled backbone (values and
  gradients, to float rounding) when the overlap covers the receptive field.
* :class:`ArtifactRemoval` — a backbone on an initial estimate (``Aᴴy``, FBP, SENSE);
  :class:`UnrolledNetwork` — gradient or CG data consistency alternating with a backbone.
* :func:`to_channels` / :func:`from_channels` — complex images as two real channels, at the
  model boundary only.
* :func:`model_halo` — a model's receptive radius along D (the halo that makes slab-wise
  results exact), :func:`reconstructor_of` and :func:`retile` (:mod:`.receptive`).
* :mod:`pipeline.models.physics` — the image-domain metric of parallel-beam CT measurements
  (what a model asks of an operator are the operator's own methods, ``op.lipschitz()``, ...).

Example::

    from pipeline.models import ArtifactRemoval, TiledBackbone, UNet3D

    unet = UNet3D(2, 2, widths=[16, 32])                      # complex MRI images: 2 channels
    model = ArtifactRemoval(TiledBackbone(unet, tile_shape=(16, 64, 64)), initial="adjoint")
    x_hat = model(y, op)                                      # (B, D, H, W) complex
"""

from .channels import from_channels, num_channels, to_channels
from .operator_steps import initial_estimate, normal_solve
from .reconstructors import ArtifactRemoval, UnrolledNetwork, intensity_scale, scan_intensity_scale, set_scan_detector
from .receptive import model_halo, reconstructor_of, retile
from .tiling import TiledBackbone, axis_windows, tile_shape_for, tile_starts
from .dncnn import DnCNN3D
from .unet import UNet3D, unet_receptive_radius

__all__ = [
    "UNet3D",
    "DnCNN3D",
    "unet_receptive_radius",
    "TiledBackbone",
    "intensity_scale",
    "scan_intensity_scale",
    "tile_starts",
    "tile_shape_for",
    "axis_windows",
    "ArtifactRemoval",
    "set_scan_detector",
    "UnrolledNetwork",
    "initial_estimate",
    "normal_solve",
    "to_channels",
    "from_channels",
    "num_channels",
    "model_halo",
    "reconstructor_of",
    "retile",
]
