"""The reconstructors ``recon(lo, hi)`` of ``recon3d reconstruct``: each maps an input D-range of
the scan to its image.

* :class:`_SlabReader` — a D-range's measurements and operator, read chunk by chunk;
* :class:`_Classical` — adjoint, FBP, SENSE or TV with given or calibrated parameters
  (:class:`~pipeline.classical.auto.AutoClassical`, read slab by slab);
* :class:`_Derived` — cone-beam FDK: the scan's ``derived/fbp``;
* :class:`_Network` — an exported model under the scan's intensity scale; what it needs to know
  of its training run (the slab thickness of the scale) comes from the export's model card
  (:mod:`pipeline.modelcard`).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline.classical.auto import AutoClassical
from pipeline.data.format import ATTRS_KEY, CTGeometry, ScanError
from pipeline.modelcard import ModelCard, read_card
from pipeline.models import model_halo, reconstructor_of, retile, set_scan_detector
from pipeline.models.rolling import rolling_for

from .config import AUTO, TV_HALO, ReconstructConfig
from .coordination import _say, resolve_model
from .pieces import pieces_for


@contextmanager
def _cpu_inference(device: torch.device) -> Iterator[None]:
    """How a backbone runs here: on CPU rolled along D (:mod:`pipeline.models.rolling`: each
    layer once, a few slices held) with the remaining whole convolutions in pieces
    (:mod:`.pieces`); unchanged on other devices."""
    with pieces_for(device), rolling_for(device):
        yield


def _weights_digest(path: Path) -> tuple[str, dict[str, Any], ModelCard | None]:
    """sha256 of an export's weights (names, dtypes, shapes, values) and configs, what it
    describes, and its model card (``None``: an export made before cards).

    The file is read weights-only and checked (:func:`pipeline.train.export.read_export`): a
    crafted pickle, a garbage file or weights with NaN/Inf are refused here, before any slab.
    """
    from pipeline.train.export import read_export

    payload = read_export(path)
    h = hashlib.sha256()
    for name in sorted(payload["state_dict"]):
        t = payload["state_dict"][name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    desc = {"model_config": payload.get("model_config"), "loss_config": payload.get("loss_config"),
            "modality": payload.get("modality"), "channels": payload.get("channels")}
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    return h.hexdigest(), {**desc, "step": payload.get("step")}, read_card(payload, path)


class _SlabReader:
    """``(y, op)`` of a D-range of a scan, as ``Scan.slab`` gives. ``ScanArray.read`` reads one
    stored object (a chunk, or a whole shard in one request on an object store) at a time into
    one preallocated result: the peak is the slab plus one stored object. The MRI mask is read
    once, so every slab operator shares it (and its cached FFT phases)."""

    def __init__(self, scan) -> None:
        self.scan = scan
        self.mask = scan.mask.read_torch() if scan.modality == "mri" else None

    @staticmethod
    def _read(array, lo: int, hi: int) -> torch.Tensor:
        return array.read_torch(slice(lo, hi))  # checked present, decoded, finite

    def __call__(self, lo: int, hi: int):
        if self.mask is not None:
            from operators3d import MultiCoilMRI

            op = MultiCoilMRI(mask=self.mask, coil_maps=self._read(self.scan.coil_maps, lo, hi))
        else:
            op = self.scan.operator(slice(lo, hi))
        return self._read(self.scan.measurements, lo, hi), op


class _Classical(AutoClassical):
    """A classical reconstruction of each input slab (no D coupling: halo 0; TV: a halo of
    ``TV_HALO`` slices): :class:`~pipeline.classical.auto.AutoClassical` with the method and
    parameters of ``config``, read slab by slab."""

    multiple = 1

    def __init__(self, scan, config: ReconstructConfig, device: torch.device) -> None:
        geom = scan.metadata.geometry
        m = config.method
        mri = scan.modality == "mri"
        cone = isinstance(geom, CTGeometry) and geom.kind == "cone"
        if m == "sense" and not mri:
            raise ValueError("reconstruct: --method sense is for MRI scans; use fbp (or fdk, tv) for CT")
        if m in ("fbp", "fdk") and mri:
            raise ValueError(f"reconstruct: --method {m} is for CT scans; use adjoint, sense or tv for MRI")
        if m == "fdk" and isinstance(geom, CTGeometry) and geom.kind == "parallel":
            raise ValueError("reconstruct: --method fdk is for cone-beam scans; use fbp for parallel beam")
        if m == "adjoint" and cone:
            raise ValueError("reconstruct: a cone-beam slab has no operator of its own; use --method fdk")
        if m == "tv" and cone:
            raise ValueError("reconstruct: --method tv runs slab by slab, which cone-beam rays do not allow "
                             "(a ray crosses slabs); use --method fdk")
        c = config
        cutoff = c.filter_cutoff if c.filter_cutoff is not None else (AUTO if c.filter == AUTO else 1.0)
        given = {"filter": c.filter, "cutoff": cutoff, "l2_weight": c.l2_weight,
                 "iterations": c.sense_iters if m == "sense" else c.tv_iters, "tv_weight": c.tv_weight}
        super().__init__(scan, m, given, calibration_slabs=c.calibration_slabs, device=device,
                         read=_SlabReader(scan), detector=c.detector)
        self.is_complex = mri
        self.radius = TV_HALO if m == "tv" else 0
        self.notes = ([f"3D TV couples neighbouring slices: each slab is solved with a halo of {TV_HALO} "
                       "slices (default), close to but not equal to the whole volume's solution"]
                      if m == "tv" else [])

    @torch.no_grad()
    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        y, op = self.read(lo, hi)
        return self.apply(y.to(self.device), op.to(self.device)).cpu()


class _Derived:
    """Cone-beam FDK: the scan's ``derived/fbp`` (made out of core by ``recon3d preprocess``)."""

    radius, multiple, notes = 0, 1, []
    is_complex = False

    def __init__(self, scan) -> None:
        self.scan = scan
        try:
            self.array = scan.derived("fbp")
        except ScanError:
            raise ScanError(
                f"scan '{scan.path}': a cone-beam scan's FDK is computed out of core by "
                f"`recon3d preprocess {scan.path} --outputs fbp`; run it, then reconstruct again"
            ) from None
        self.parameters = dict(self.array.array.attrs).get(ATTRS_KEY, {}).get("parameters")

    def describe(self) -> dict[str, Any]:
        return {"method": "fdk", "source": "derived/fbp", "parameters": self.parameters}

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        return self.array.read_torch(slice(lo, hi))


def _training_tiles(model: torch.nn.Module) -> tuple[int, int, int] | None:
    """The tile shape the model's backbone was trained with, if it was tiled."""
    from pipeline.models.tiling import TiledBackbone

    tiled = next((m for m in model.modules() if isinstance(m, TiledBackbone)), None)
    return tuple(int(t) for t in tiled.tile_shape) if tiled is not None else None


class _Network:
    """An exported model ``model(y, op)`` on each input slab, under the scan's intensity scale."""

    def __init__(self, scan, config: ReconstructConfig, device: torch.device, *, rank: int) -> None:
        from pipeline.train import load_exported

        geom = scan.metadata.geometry
        if isinstance(geom, CTGeometry) and geom.kind == "cone":
            raise ScanError(
                f"scan '{scan.path}': cone-beam rays cross slabs, so a model cannot run slab by slab "
                "on its measurements; reconstruct it with --method fdk"
            )
        self.weights = resolve_model(config.model, rank=rank, timeout_s=config.wait_timeout_s,  # type: ignore[arg-type]
                                     pick=config.pick)
        self.digest, self.info, self.card = _weights_digest(self.weights)
        if self.info.get("modality") not in (None, scan.modality):
            raise ValueError(
                f"reconstruct: the model was trained on {self.info['modality']} scans, the scan is {scan.modality}"
            )
        model = load_exported(self.weights)
        tile, trained_tiles = config.tile, _training_tiles(model)
        if tile is None and trained_tiles is not None:
            # Tiles bound a training step's memory (their overlap is rarely exact); here the
            # memory budget chooses the slab instead, and the output is the network itself.
            tile = (0, 0, 0)
        self.model = retile(model, tile, config.overlap).to(device).eval()
        radius, self.multiple, self.notes = model_halo(self.model)
        # A model trained with model.initial_detector: auto starts from the detector-aware FBP of
        # this scan's own levels (its detector record), as it did on its training scans.
        self.clip_levels = None
        if set_scan_detector(self.model, getattr(scan.metadata, "detector", None)):
            self.clip_levels = reconstructor_of(self.model).clip_levels()
        if tile != config.tile:
            _say(f"the model was trained on tiles {trained_tiles}; it runs untiled here (the memory budget "
                 "chooses the slab); --tile D H W tiles it", config.progress and rank == 0)
        if radius is None and config.halo is None:
            raise ValueError(
                "reconstruct: the model normalises over its whole input (instance/group norm), so "
                "slabs cannot equal the whole volume; pass --halo N to reconstruct anyway"
            )
        self.radius = int(radius or 0)
        if scan.modality == "mri" and type(reconstructor_of(self.model)).__name__ == "UnrolledNetwork":
            self.notes = self.notes + [
                "unrolled step 1/L uses max sum|S|^2 over each input slab: the whole volume's for "
                "coil maps normalised to sum|S|^2 = 1 (simulated, ESPIRiT), to float32 rounding"
            ]
        self.scan, self.device = scan, device
        self.read = _SlabReader(scan)
        self.is_complex = scan.modality == "mri"
        self.scale_thickness = self._scale_thickness(config, rank)
        self.storage_options = dict(config.storage_options or {}) or None
        self.scale: float | None = None
        # Slices per read of a staged initial estimate: one stored object (a chunk, or a shard on
        # an object store), so the data held at once does not grow with the slab.
        self.piece = max(1, int(scan.measurements.stored_depth), int(scan.chunk_depth))
        self.tile = tile
        self.overlap = config.overlap

    def _scale_thickness(self, config: ReconstructConfig, rank: int) -> int | None:
        """The training slab thickness the intensity scale is measured on: the model card's; for
        an export made before cards, the run's resolved config when ``--model`` is a run directory."""
        if self.card is not None:
            return self.card.slab_thickness
        thickness = _training_thickness(config.model)
        source = (f"{config.model}/config.resolved.yaml ({thickness})" if thickness is not None
                  else "nowhere: the scale is measured on slabs of the scan's chunk depth")
        _say(f"{self.weights} has no model card (exported before recon3d wrote one): the training slab "
             f"thickness comes from {source}; export the run again to record it", config.progress and rank == 0)
        return thickness

    def measure_scale(self) -> float | None:
        """The scan's intensity scale for this model (as training computes it; rank 0 only:
        the other ranks, and resumed runs, take the one recorded in the output)."""
        from pipeline.train.build import scan_scale

        return scan_scale(self.model, self.scan.path, thickness=self.scale_thickness,
                          storage_options=self.storage_options, device=self.device)

    def describe(self) -> dict[str, Any]:
        # The scale is a function of the weights, the scan and the thickness, all in here; its
        # value is recorded in the attributes, not hashed (ranks and devices round it apart).
        return {"model": {"sha256": self.digest, **self.info}, "tile": self.tile, "overlap": self.overlap,
                "scale_thickness": self.scale_thickness}

    def memory_model(self, shape: tuple[int, int, int], config: ReconstructConfig):
        """What this model's slab peak is estimated from (:mod:`.memory`): the scan's bytes per
        slice, the image's, the backbone's activation bytes (measured once on small zero inputs:
        per voxel and per plane voxel when it rolls along D on CPU, per voxel otherwise) and
        its tiling."""
        from pipeline.models.receptive import _backbones
        from pipeline.models.tiling import TiledBackbone

        from .memory import (ROLLED_HEAP, MemoryModel, activation_bytes_per_voxel, first_width, piece_workspace,
                             rolling_activation_bytes)

        d, h, w = shape
        data = self.scan.measurements.nbytes // max(1, self.scan.measurements.depth)
        if self.scan.coil_maps is not None:
            data += self.scan.coil_maps.nbytes // max(1, self.scan.coil_maps.depth)
        backbones = _backbones(reconstructor_of(self.model))
        tiled = next((bb for bb in backbones if isinstance(bb, TiledBackbone)), None)
        channels = 2 if self.is_complex else 1
        per_plane = 0.0
        workspace = piece_workspace(first_width(backbones), self.device)
        if tiled is None and self.device.type == "cpu":  # rolled along D there (_cpu_inference)
            per_voxel, per_plane = rolling_activation_bytes(backbones, channels, self.multiple, (h, w))
            workspace += ROLLED_HEAP
        else:
            per_voxel = activation_bytes_per_voxel(backbones, channels, self.multiple, self.device)
        return MemoryModel(shape=(d, h, w), data_per_slice=int(data), activation_per_plane=per_plane,
                           image_per_slice=h * w * (8 if self.is_complex else 4), activation_per_voxel=per_voxel,
                           tile=tuple(tiled.tile_shape) if tiled is not None else None,
                           tiles_per_batch=int(tiled.tiles_per_batch) if tiled is not None else 1,
                           staged=self.staged, workers=max(1, int(config.workers)), piece=self.piece,
                           workspace=workspace)

    @property
    def staged(self) -> bool:
        """Whether the model is an ``ArtifactRemoval`` with a D-local initial estimate, which
        is then computed piece by piece: ``model(y, op)`` is ``model(initial_estimate(y, op),
        None)`` (its image mode), so the multi-coil k-space and coil maps of the whole input
        slab (16× the image for 8 coils) are never held at once."""
        from pipeline.models import ArtifactRemoval

        return isinstance(self.model, ArtifactRemoval) and self.model.initial in ("adjoint", "fbp")

    @torch.no_grad()
    def apply(self, y: torch.Tensor, op) -> torch.Tensor:
        """The model on measurements ``y`` of operator ``op`` (under the active intensity scale)."""
        with _cpu_inference(self.device):
            return self.model(y.unsqueeze(0).to(self.device), op.to(self.device))[0]

    @torch.no_grad()
    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        # On CPU the backbone rolls along D and its whole convolutions run in pieces: the same
        # output to float rounding, its memory a few slices per layer plus the output
        # (BENCHMARKS.md, issue 17.2).
        if not self.staged:
            y, op = self.read(lo, hi)
            y, op = y.unsqueeze(0).to(self.device), op.to(self.device)
            with _cpu_inference(self.device):
                return self.model(y, op)[0].cpu()
        parts = []
        for a in range(lo, hi, self.piece):
            y, op = self.read(a, min(a + self.piece, hi))
            # the model's own initial estimate (its FBP window...): the network's training input
            parts.append(self.model.initial_image(y.unsqueeze(0).to(self.device), op.to(self.device)))
            del y, op
        x0 = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-3)
        del parts
        with _cpu_inference(self.device):
            return self.model(x0, None)[0].cpu()


def _training_thickness(model: str | None) -> int | None:
    """The slab thickness the run trained with (its intensity scale used it), if known: for an
    export without a model card, read from the run directory's resolved config."""
    if model is None or not Path(model).is_dir():
        return None
    resolved = Path(model) / "config.resolved.yaml"
    if not resolved.is_file():
        return None
    import yaml

    cfg = yaml.safe_load(resolved.read_text()) or {}
    value = (cfg.get("data") or {}).get("slab_thickness")
    return int(value) if value else None
