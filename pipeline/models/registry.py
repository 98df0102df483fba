"""The backbones and reconstructors a training config can name, and how each is built.

:data:`BACKBONES` and :data:`RECONSTRUCTORS` map the names of ``model.backbone`` and
``model.reconstructor`` (:class:`~pipeline.train.config.ModelConfig`, whose allowed values are
these keys) to builders that :func:`pipeline.train.build.build_model` calls: a new network is
one builder and one entry here.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .dncnn import DnCNN3D
from .reconstructors import ArtifactRemoval, UnrolledNetwork
from .unet import UNet3D

__all__ = ["BACKBONES", "RECONSTRUCTORS"]


def _unet(cfg: Any, channels: int) -> nn.Module:
    return UNet3D(channels, channels, widths=cfg.widths, convs_per_level=cfg.convs_per_level, norm=cfg.norm,
                  activation=cfg.activation, residual=cfg.residual, checkpoint=cfg.activation_checkpointing)


def _dncnn(cfg: Any, channels: int) -> nn.Module:
    return DnCNN3D(channels, channels, width=cfg.dncnn_width, depth=cfg.dncnn_depth,
                   activation=cfg.activation, residual=cfg.residual)


def _artifact_removal(backbone: nn.Module, cfg: Any) -> nn.Module:
    return ArtifactRemoval(backbone, initial=cfg.initial, normalize=cfg.normalize, fbp_filter=cfg.fbp_filter,
                           initial_detector=cfg.initial_detector)


def _unrolled(backbone: nn.Module, cfg: Any) -> nn.Module:
    u = cfg.unrolled
    return UnrolledNetwork(backbone, num_iters=u.iterations, data_consistency=u.data_consistency,
                           shared=u.shared, initial=cfg.initial, normalize=cfg.normalize, step_size=u.step_size,
                           fbp_filter=cfg.fbp_filter)


#: ``model.backbone`` → ``build(model_config, channels)``: the network on real channels.
BACKBONES: dict[str, Callable[[Any, int], nn.Module]] = {"unet": _unet, "dncnn": _dncnn}
#: ``model.reconstructor`` → ``build(backbone, model_config)``: the model ``model(y, op)``.
RECONSTRUCTORS: dict[str, Callable[[nn.Module, Any], nn.Module]] = {
    "artifact_removal": _artifact_removal, "unrolled": _unrolled}
