"""GIN-IPA baseline, in 3D (batched).

Ouyang, Chen, Li, Li, Qin, Bai, Rueckert, "Causality-inspired single-source domain generalization for
medical image segmentation", IEEE TMI 2022 (arXiv 2111.12525; official code:
github.com/cheng-01037/Causality-Medical-Image-Domain-Generalization, MIT — read, not copied).

**GIN — Global Intensity Non-linear augmentation** (their ``GINGroupConv``/``GINGroupConv3D``,
configuration ``gin_nlayer=4, gin_n_interm_ch=2, gin_norm='frob'``):

* 4 convolution layers, channels 1 → 2 → 2 → 2 → 1, 'same' zero padding;
* each layer's kernel size drawn from {1, 3}; weights N(0, 1) (no fan-in scaling); a random bias
  N(0, 1) per output channel; LeakyReLU with PyTorch's default slope 0.01 after every layer except the
  last;
* ``mixed = α·h + (1-α)·x`` with α ~ U(0, 1) per sample;
* Frobenius renormalisation per sample: ``out = mixed · ‖x‖_F / (‖mixed‖_F + 1e-5)``.

Departure: their layer draws one kernel size per call for the whole batch; we draw it per sample and
layer (one grouped convolution per layer, 1³ kernels embedded in 3³ ones), so every sample gets an
independent network.

**IPA — Interventional Pseudo-correlation Augmentation.** A smooth random blending field
``m ∈ [0, 1]`` mixes two GIN views with complementary weights. Their 2D field (Chen Chen's
``AdvBias``, config ``blend_grid_size=24`` on 192² images at ``downscale=2``, ``interpolation_order=2``,
``init_mode='gaussian'``): control points N(0, 1) on a coarse grid about four cells across the image,
unit-L2-normalised per sample, interpolated with a quadratic B-spline, ``exp``, then min–max rescaled
to [0, 1]. Their 3D IPA was never released; ours is the direct 3D analogue: 4 cells along every axis
(6 quadratic-B-spline control points per axis, the spline evaluated exactly at full resolution
instead of at half resolution followed by linear upsampling).

**Training recipe** (their ``exp_trainer.py``; what the trainer must wire for ``gin_ipa``):

1. ``a, b, c = gin_ipa(image, generator)``: three independent GIN views g₁, g₂, g₃ of the batch;
   ``a = g₁·m + g₂·(1-m)``, ``b = g₁·(1-m) + g₂·m``, ``c = g₃``.
2. One forward pass of ``torch.cat([a, b, c])`` (3× the batch) → logits, split back into three.
3. Segmentation loss (their Dice + cross-entropy; ours: the trainer's loss) on the **first view
   only** (``a``), against the unchanged labels.
4. Plus :func:`consistency_loss` ``(logits_a, logits_b, logits_c)``: λ = 10 (their
   ``lambda_consist``) × KL(p̄ ‖ p_i) averaged over all elements, p̄ the mean prediction.

Plain GIN (``gin``) is their GIN-only ablation: one view, no consistency term needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _common
from ._common import (GeneratorLike, as_generator, bspline_upsample, check_image, frobenius, randint, randn,
                      uniform)

#: GIN architecture of their configs.
GIN_LAYERS = 4
GIN_INTERM_CHANNELS = 2
GIN_KERNEL_SIZES = (1, 3)
GIN_SLOPE = 0.01  # torch.nn.functional.leaky_relu's default, which their blocks use
#: IPA control grid: cells per axis (their 24-px spacing on a 96-px half-resolution image) and order.
IPA_CELLS = 4
IPA_ORDER = 2
#: Weight of the consistency term (their ``lambda_consist``).
GIN_CONSISTENCY_WEIGHT = 10.0


@torch.no_grad()
def gin(image: torch.Tensor, generator: GeneratorLike = None, *, n_layers: int = GIN_LAYERS,
        interm_channels: int = GIN_INTERM_CHANNELS, kernel_sizes: tuple[int, ...] = GIN_KERNEL_SIZES,
        negative_slope: float = GIN_SLOPE, return_params: bool = False,
        ) -> torch.Tensor | tuple[torch.Tensor, dict[str, object]]:
    """One GIN view of ``image (B, 1, D, H, W)``: ``(B, 1, D, H, W)`` float32, same ‖·‖_F per sample.

    With ``return_params`` also returns ``{"kernel_sizes": (B, n_layers), "weights": per layer
    (B, c_out, c_in, k, k, k) with k = max size, zero outside each sample's kernel, "biases": per layer
    (B, c_out), "alpha": (B,)}`` for tests.
    """
    check_image(image)
    if n_layers < 2:
        raise ValueError(f"GIN needs at least 2 layers, got {n_layers}")
    g = as_generator(generator)
    kmax = max(kernel_sizes)
    with torch.autocast(device_type=image.device.type, enabled=False):
        x = image.float()
        b, spatial = x.shape[0], x.shape[2:]
        chans = [1] + [interm_channels] * (n_layers - 1) + [1]
        pick = randint(len(kernel_sizes), (b, n_layers), g, x.device)
        sizes = torch.tensor(kernel_sizes, device=x.device)[pick]
        if _common.expand_first_layer(x.device):  # CPU: one channels-last copy per output channel
            h = x.expand(b, chans[1], *spatial).reshape(1, b * chans[1], *spatial)
            h, first_groups = h.contiguous(memory_format=torch.channels_last_3d), b * chans[1]
        else:
            h, first_groups = x.reshape(1, b, *spatial), b
        all_w, all_b = [], []
        for layer in range(n_layers):
            c_in, c_out = chans[layer], chans[layer + 1]
            w = randn((b, c_out, c_in, kmax, kmax, kmax), g, x.device)
            w = w * _centre_mask(sizes[:, layer], kmax)  # smaller kernels: zero outside their support
            bias = randn((b * c_out,), g, x.device)
            all_w.append(w)
            all_b.append(bias.view(b, c_out))
            h = F.conv3d(h, w.reshape(b * c_out, c_in, kmax, kmax, kmax), bias, padding=kmax // 2,
                         groups=first_groups if layer == 0 else b)
            if layer < n_layers - 1:
                h = F.leaky_relu_(h, negative_slope)
        h = h.contiguous().view(b, 1, *spatial)
        a = uniform((b,), 0.0, 1.0, g, x.device).view(b, 1, 1, 1, 1)
        mixed = a * h + (1.0 - a) * x
        gain = frobenius(x) / (frobenius(mixed) + 1e-5)
        out = mixed * gain.view(b, 1, 1, 1, 1)
    if return_params:
        return out, {"kernel_sizes": sizes, "weights": all_w, "biases": all_b, "alpha": a.view(b)}
    return out


def _centre_mask(sizes: torch.Tensor, kmax: int) -> torch.Tensor:
    """``(B, 1, 1, kmax, kmax, kmax)`` masks keeping the central ``k³`` taps of each sample's kernel."""
    r = torch.arange(kmax, device=sizes.device) - kmax // 2
    inside = r.abs().view(1, kmax) <= (sizes.view(-1, 1) // 2)  # (B, kmax)
    m = inside[:, :, None, None] & inside[:, None, :, None] & inside[:, None, None, :]
    return m.float().view(-1, 1, 1, kmax, kmax, kmax)


@torch.no_grad()
def ipa_field(batch: int, shape: tuple[int, int, int], generator: GeneratorLike = None, *,
              device: torch.device | str = "cpu", cells: int | tuple[int, int, int] = IPA_CELLS,
              order: int = IPA_ORDER) -> torch.Tensor:
    """IPA blending fields ``(B, 1, D, H, W)`` in [0, 1] (min 0 and max 1 in every sample)."""
    g = as_generator(generator)
    cells3 = (cells,) * 3 if isinstance(cells, int) else tuple(cells)
    coeffs = randn((batch, 1, *(c + order for c in cells3)), g, device)
    # their unit_normalize('l2'): divide by the max |value|, then by the L2 norm (per sample)
    flat = coeffs.view(batch, -1)
    flat = flat / (flat.abs().amax(dim=1, keepdim=True) + 1e-20)
    flat = flat / torch.sqrt(1e-6 + (flat * flat).sum(dim=1, keepdim=True))
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        field = torch.exp(bspline_upsample(flat.view_as(coeffs), shape, order))
    f = field.view(batch, -1)
    lo, hi = f.amin(dim=1, keepdim=True), f.amax(dim=1, keepdim=True)
    # their rescale_intensity: (x - min + eps) / (max - min + eps), eps = 1e-20
    return ((f - lo + 1e-20) / (hi - lo + 1e-20)).view(batch, 1, *shape)


@torch.no_grad()
def gin_ipa(image: torch.Tensor, generator: GeneratorLike = None, *, plain_view: bool = True,
            return_field: bool = False) -> tuple[torch.Tensor, ...]:
    """The GIN-IPA training views of ``image (B, 1, D, H, W)`` (see the module docstring's recipe).

    Returns ``(a, b, c)`` — the two IPA-blended views and a plain GIN view, each ``(B, 1, D, H, W)`` —
    or ``(a, b)`` with ``plain_view=False``; with ``return_field`` the blending field ``m`` is
    appended. The segmentation loss goes on ``a``; :func:`consistency_loss` on all views' logits.
    """
    check_image(image)
    g = as_generator(generator)
    g1 = gin(image, g)
    g2 = gin(image, g)
    g3 = gin(image, g) if plain_view else None
    m = ipa_field(image.shape[0], tuple(image.shape[2:]), g, device=image.device)
    a = g1 * m + g2 * (1.0 - m)
    b = g1 * (1.0 - m) + g2 * m
    views: tuple[torch.Tensor, ...] = (a, b) if g3 is None else (a, b, g3)
    return views + (m,) if return_field else views


def consistency_loss(logits_views: list[torch.Tensor] | tuple[torch.Tensor, ...],
                     weight: float = GIN_CONSISTENCY_WEIGHT) -> torch.Tensor:
    """GIN-IPA's consistency term: ``weight · mean over views and elements of p̄·(log p̄ − log p_i)``.

    Their ``torch.nn.KLDivLoss()`` (default ``reduction='mean'``) on ``log_softmax`` of all views
    against the average softmax ``p̄`` (not detached, as theirs): KL(p̄ ‖ p_i) averaged over every
    element, i.e. over batch, classes and voxels. ``logits_views``: ``(B, C, D, H, W)`` each.
    """
    log_probs = torch.stack([F.log_softmax(v.float(), dim=1) for v in logits_views])
    # log p̄ from the views' log-probabilities (log-sum-exp), not log of p̄: where a class's softmax
    # underflows to 0 in every view (logit gaps ≳ 100, reached by confident networks), the value is the
    # same but the gradient of xlogy(p̄, p̄) = p̄·log p̄ — which is what F.kl_div computes — is 0/0 = NaN,
    # and every training step with such a voxel would be skipped. d(e^l·l)/dl = e^l·(l + 1) stays finite.
    log_avg = torch.logsumexp(log_probs, dim=0) - math.log(len(logits_views))
    p_avg = log_avg.exp()
    # = F.kl_div(lp, p_avg, reduction="mean") per view, averaged over the views
    terms = [(p_avg * (log_avg - lp)).mean() for lp in log_probs]
    return weight * sum(terms) / len(terms)


__all__ = ["GIN_CONSISTENCY_WEIGHT", "consistency_loss", "gin", "gin_ipa", "ipa_field"]
