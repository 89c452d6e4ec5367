"""Spatial augmentation on the training device, batched — SRCSM §1.4 "Spatial".

Per sample, an output→input sampling transform (SimpleITK convention: a scale > 1 zooms *out*),
applied from the output voxel in the reference's order:

1. B-spline elastic deformation: cubic B-spline, 8×8×8 control points (mesh size 5) spanning the
   output patch, every displacement component U(-15, 15) mm. Evaluated exactly at every output voxel
   (separable basis matrices) — no half-resolution displacement field as in the reference.
2. per-axis scale ×(1 + U(-0.1, 0.1)), isotropic scale ×(1 + U(-0.2, 0.2)),
3. rotation by independent U(-0.35, 0.35) rad about x, y and z (``R = Rz·Ry·Rx``),
4. translation U(-20, 20) mm per axis,
5. the output centre goes to the input centre.

Everything is computed in millimetres with the patch spacing, so rotations are physical rotations
also for anisotropic voxels, and then sampled with ``grid_sample(align_corners=True)``.

**Larger input crop.** The input may be larger than the output patch: the trainer crops about
``1.25 × patch`` around the chosen centre (same spacing) and this module resamples the output patch
from it, so rotations and scaling pull in real anatomy rather than padding. The two centres coincide:
keep ``input - output`` even along each axis or the centre lands between voxels (a half-voxel shift).
Outside the input crop the image takes ``pad_value`` (the trainer passes the image minimum; the
reference uses 0 in raw units) and labels take 0.

**Labels** (``label_mode``):

* ``"paper"`` (default): nearest-neighbour resampling, then SRCSM's label smoothing — one-hot,
  Gaussian σ = 1 voxel per channel (skimage's defaults: truncate 4 ⇒ radius 4, edge replicate),
  argmax;
* ``"linear"``: one-hot → trilinear resampling → the same Gaussian → argmax (smoother boundaries);
* ``"nearest"``: nearest neighbour only.

Axis conventions: tensors are ``(B, C, D, H, W)`` = (z, y, x); ``spacing``, scales, angles,
translations and displacement components are in (x, y, z) order, as SimpleITK and ``model.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from ._common import GeneratorLike, as_generator, bspline_upsample, check_image, check_labels, \
    separable_gaussian_3d, uniform

LabelMode = Literal["paper", "linear", "nearest"]

#: SRCSM §1.4 ranges.
SCALE_RANGE = 0.1
ISO_SCALE_RANGE = 0.2
ROTATION_RANGE = 0.35
TRANSLATION_MM = 20.0
ELASTIC_MM = 15.0
ELASTIC_NODES = 8  # cubic B-spline, mesh size 5
#: Label smoothing of the reference (``Dataset.smooth_labels``): σ = 1 voxel, skimage truncate 4.
LABEL_SIGMA = 1.0
LABEL_RADIUS = 4


@dataclass
class SpatialParams:
    """Per-sample parameters of the sampling transform (all tensors on one device, float32).

    ``scale (B, 3)`` per-axis factors (x, y, z); ``iso_scale (B,)``; ``angles (B, 3)`` radians about
    x, y, z; ``translation (B, 3)`` mm (x, y, z); ``control_points (B, 3, n, n, n)`` displacement
    components (x, y, z) in mm on a grid indexed (z, y, x), or ``None`` for no elastic deformation.
    """

    scale: torch.Tensor
    iso_scale: torch.Tensor
    angles: torch.Tensor
    translation: torch.Tensor
    control_points: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return int(self.iso_scale.shape[0])

    @classmethod
    def identity(cls, batch: int, device: torch.device | str = "cpu") -> "SpatialParams":
        z3 = torch.zeros(batch, 3, device=device)
        ones = torch.ones(batch, device=device)
        return cls(torch.ones(batch, 3, device=device), ones, z3.clone(), z3.clone())

    def to(self, device: torch.device | str) -> "SpatialParams":
        cp = None if self.control_points is None else self.control_points.to(device)
        return replace(self, scale=self.scale.to(device), iso_scale=self.iso_scale.to(device),
                       angles=self.angles.to(device), translation=self.translation.to(device),
                       control_points=cp)

    def matrix(self) -> torch.Tensor:
        """The linear part ``A = R · diag(scale) · iso_scale`` as ``(B, 3, 3)`` acting on (x, y, z)."""
        return rotation_matrix(self.angles) @ torch.diag_embed(self.scale * self.iso_scale[:, None])


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """``Rz(θz) · Ry(θy) · Rx(θx)`` for ``angles (B, 3)`` = (θx, θy, θz), right-handed, (x, y, z)."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def m(rows: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rx = m([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = m([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rz = m([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


def sample_spatial_params(batch: int, generator: GeneratorLike = None, *, device: torch.device | str = "cpu",
                          scale_range: float = SCALE_RANGE, iso_scale_range: float = ISO_SCALE_RANGE,
                          rotation_range: float = ROTATION_RANGE, translation_mm: float = TRANSLATION_MM,
                          elastic_mm: float = ELASTIC_MM, elastic_nodes: int = ELASTIC_NODES,
                          ) -> SpatialParams:
    """Draw SRCSM's random spatial parameters for ``batch`` samples (``elastic_mm=0``: no deformation)."""
    g = as_generator(generator)
    scale = 1.0 + uniform((batch, 3), -scale_range, scale_range, g, device)
    iso = 1.0 + uniform((batch,), -iso_scale_range, iso_scale_range, g, device)
    angles = uniform((batch, 3), -rotation_range, rotation_range, g, device)
    translation = uniform((batch, 3), -translation_mm, translation_mm, g, device)
    cp = None
    if elastic_mm > 0:
        n = elastic_nodes
        cp = uniform((batch, 3, n, n, n), -elastic_mm, elastic_mm, g, device)
    return SpatialParams(scale, iso, angles, translation, cp)


def _spacing_tensor(spacing: Sequence[float], device: torch.device) -> torch.Tensor:
    sp = torch.as_tensor(spacing, dtype=torch.float32, device=device).flatten()
    if sp.numel() != 3 or not bool((sp > 0).all()):
        raise ValueError(f"spacing must be three positive numbers (x, y, z) in mm, got {spacing}")
    return sp


def sampling_grid(params: SpatialParams, in_shape: Sequence[int], out_shape: Sequence[int],
                  spacing: Sequence[float]) -> torch.Tensor:
    """The ``grid_sample`` grid ``(B, D, H, W, 3)`` (align_corners=True) of the transform.

    ``in_shape``/``out_shape`` are (D, H, W); ``spacing`` (x, y, z) mm is shared by input and output.
    """
    device = params.scale.device
    sp = _spacing_tensor(spacing, device)
    d, h, w = (int(v) for v in out_shape)
    # input size along x, y, z
    n_in = torch.tensor([in_shape[2], in_shape[1], in_shape[0]], dtype=torch.float32, device=device)
    if bool((n_in < 2).any()):
        raise ValueError(f"input must have at least 2 voxels along every axis, got {tuple(in_shape)}")
    # output voxel centres in mm relative to the output centre, (x, y, z) components
    axes = [(torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0) * sp[i]
            for i, n in enumerate((w, h, d))]
    zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    p = torch.stack([xx, yy, zz], dim=-1).expand(params.batch, d, h, w, 3)
    if params.control_points is not None:
        disp = bspline_upsample(params.control_points, (d, h, w), order=3)  # (B, 3, D, H, W) mm
        p = p + disp.permute(0, 2, 3, 4, 1)
    q = torch.einsum("bdhwj,bij->bdhwi", p, params.matrix()) + params.translation.view(-1, 1, 1, 1, 3)
    # mm relative to the input centre → continuous input index → [-1, 1]
    idx = q / sp + (n_in - 1) / 2.0
    return 2.0 * idx / (n_in - 1) - 1.0


def _smooth_argmax(onehot_fg: torch.Tensor) -> torch.Tensor:
    """Argmax over [background, foreground…] after the reference's Gaussian label smoothing."""
    fg = separable_gaussian_3d(onehot_fg, LABEL_SIGMA, LABEL_RADIUS, padding="replicate")
    bg = 1.0 - fg.sum(dim=1, keepdim=True)  # the background channel, blurred (blur is linear, sums to 1)
    return torch.cat([bg, fg], dim=1).argmax(dim=1)


def _onehot_fg(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Foreground one-hot channels ``(B, L-1, D, H, W)`` float32 (background is 1 - their sum)."""
    oh = torch.zeros((labels.shape[0], num_classes, *labels.shape[1:]), device=labels.device)
    oh.scatter_(1, labels.unsqueeze(1).long(), 1.0)
    return oh[:, 1:]


@torch.no_grad()
def spatial_transform(image: torch.Tensor, labels: torch.Tensor | None, params: SpatialParams,
                      out_shape: Sequence[int], spacing: Sequence[float], *,
                      pad_value: float | torch.Tensor = 0.0, label_mode: LabelMode = "paper",
                      num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample ``image (B, 1, Di, Hi, Wi)`` and ``labels (B, Di, Hi, Wi)`` to ``out_shape`` (D, H, W).

    Image: trilinear, ``pad_value`` (a float or one value per sample, ``(B,)``) outside the input.
    Labels: see ``label_mode`` in the module docstring; int64 in [0, num_classes), 0 outside.
    ``num_classes`` (L, background included) is needed by the smoothing modes; when omitted it is
    ``labels.max() + 1`` (a device synchronisation). Returns ``(image, labels)``, float32 and int64.
    """
    check_image(image)
    if labels is not None:
        check_labels(labels, image)
    if params.batch != image.shape[0]:
        raise ValueError(f"params are for {params.batch} samples, image has {image.shape[0]}")
    params = params.to(image.device)
    with torch.autocast(device_type=image.device.type, enabled=False):
        grid = sampling_grid(params, image.shape[2:], out_shape, spacing)
        pad = torch.as_tensor(pad_value, dtype=torch.float32, device=image.device)
        pad = pad.view(-1, 1, 1, 1, 1) if pad.dim() > 0 else pad
        out = F.grid_sample(image.float() - pad, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True) + pad
        if labels is None:
            return out, None
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        if label_mode == "nearest" or label_mode == "paper":
            lab = F.grid_sample(labels.unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros",
                                align_corners=True)[:, 0].round().long()
            if label_mode == "paper" and num_classes > 1:
                lab = _smooth_argmax(_onehot_fg(lab, num_classes))
        elif label_mode == "linear":
            if num_classes > 1:
                fg = F.grid_sample(_onehot_fg(labels, num_classes), grid, mode="bilinear",
                                   padding_mode="zeros", align_corners=True)
                lab = _smooth_argmax(fg)
            else:
                lab = torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.long, device=out.device)
        else:
            raise ValueError(f"label_mode must be 'paper', 'linear' or 'nearest', got {label_mode!r}")
    return out, lab


@torch.no_grad()
def random_spatial(image: torch.Tensor, labels: torch.Tensor | None, out_shape: Sequence[int],
                   spacing: Sequence[float], generator: GeneratorLike = None, *,
                   pad_value: float | torch.Tensor = 0.0, label_mode: LabelMode = "paper",
                   num_classes: int | None = None, **ranges: float,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw SRCSM's random transform per sample and apply it (see :func:`spatial_transform`).

    ``ranges`` override :func:`sample_spatial_params`'s keyword ranges (e.g. ``elastic_mm=0``).
    """
    params = sample_spatial_params(image.shape[0], generator, device=image.device, **ranges)
    return spatial_transform(image, labels, params, out_shape, spacing, pad_value=pad_value,
                             label_mode=label_mode, num_classes=num_classes)


__all__ = ["LabelMode", "SpatialParams", "random_spatial", "rotation_matrix", "sample_spatial_params",
           "sampling_grid", "spatial_transform"]
