"""RandConv baseline, in 3D: one random convolution layer per sample.

Xu, Liu, Yang, Raffel, Niethammer, "Robust and Generalizable Visual Representation Learning via
Random Convolutions", ICLR 2021 (official code: github.com/wildphoton/RandConv). We implement their
**RC_mix** variant — the one their scripts pair with the consistency loss:

* kernel size drawn uniformly from {1, 3, 5, 7} (their multi-scale setting ``-ks 1 3 5 7``);
* weights Kaiming-normal with gain 1, i.e. N(0, 1/fan_in) with fan_in = C_in·k³ (their
  ``kaiming_normal`` with ``nonlinearity='conv2d'``, here for 3D kernels); no bias (their default);
  'same' zero padding, stride 1, one output channel for our one input channel;
* mixing ``out = α·conv(x) + (1-α)·x`` with α ~ U(0, 1);
* no output renormalisation and no clamping (their ``clamp_output`` needs RGB data statistics);
* optional consistency loss: three RandConv views of a batch, λ = 10, the Jensen–Shannon-style
  term ``mean_i KL(p_i ‖ p̄)`` with ``p̄`` the mean of the three predictions — see
  :func:`consistency_loss`.

Departure: the reference draws one random layer per mini-batch (``randomize()`` once per step). We
draw one per *sample*, because our 3D batches hold one or two patches and per-sample draws give more
diversity at no cost. Batched: samples that drew the same kernel size share one grouped convolution
(at most four convolutions per call, whatever the batch size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import GeneratorLike, as_generator, check_image, randint, randn, uniform

#: Kernel sizes of the multi-scale RandConv setting.
RANDCONV_KERNEL_SIZES = (1, 3, 5, 7)
#: Weight of the consistency loss in their RC_mix experiments (``-cl -clw 10``).
RANDCONV_CONSISTENCY_WEIGHT = 10.0


@torch.no_grad()
def randconv(image: torch.Tensor, generator: GeneratorLike = None, *,
             kernel_sizes: tuple[int, ...] = RANDCONV_KERNEL_SIZES, mixing: bool = True,
             return_params: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RandConv (RC_mix) of ``image (B, 1, D, H, W)``; returns ``(B, 1, D, H, W)`` float32.

    With ``return_params`` also returns ``{"kernel_size": (B,), "alpha": (B,), "weights": list of B
    kernels (1, 1, k, k, k)}`` for tests. ``mixing=False`` is their RC_img variant (α = 1).
    """
    check_image(image)
    g = as_generator(generator)
    with torch.autocast(device_type=image.device.type, enabled=False):
        x = image.float()
        b = x.shape[0]
        sizes = torch.tensor(kernel_sizes)[randint(len(kernel_sizes), (b,), g, "cpu")]
        alpha = uniform((b,), 0.0, 1.0, g, x.device) if mixing else torch.ones(b, device=x.device)
        weights: list[torch.Tensor] = []
        for i in range(b):  # draws in sample order, so a seed means the same thing for any grouping
            k = int(sizes[i])
            fan_in = 1 * k ** 3  # C_in · k³
            weights.append(randn((1, 1, k, k, k), g, x.device) / math.sqrt(fan_in))
        out = torch.empty_like(x)
        for k in sorted(set(sizes.tolist())):
            idx = (sizes == k).nonzero().flatten().tolist()
            w = torch.cat([weights[i] for i in idx], dim=0)  # (n, 1, k, k, k): one group per sample
            xs = x[idx].reshape(1, len(idx), *x.shape[2:])
            out[idx] = F.conv3d(xs, w, padding=k // 2, groups=len(idx)).reshape(len(idx), 1, *x.shape[2:])
        a = alpha.view(b, 1, 1, 1, 1)
        out = a * out + (1.0 - a) * x
    if return_params:
        return out, {"kernel_size": sizes, "alpha": alpha, "weights": weights}
    return out


def consistency_loss(logits_views: list[torch.Tensor] | tuple[torch.Tensor, ...],
                     weight: float = RANDCONV_CONSISTENCY_WEIGHT) -> torch.Tensor:
    """RandConv's consistency term: ``weight · mean_i KL(p_i ‖ p̄)``, ``p̄ = mean_i p_i``.

    ``logits_views`` are the segmentation logits ``(B, C, D, H, W)`` of the views (they use 3). Their
    classification code uses ``reduction='batchmean'`` (sum over classes, mean over the batch); for
    dense prediction we sum over classes and average over the batch *and the voxels*, so the term's
    scale does not depend on the patch size. ``p̄`` is clamped to [1e-7, 1] before the log, as theirs.
    """
    probs = [F.softmax(v.float(), dim=1) for v in logits_views]
    log_mix = torch.clamp(sum(probs) / len(probs), 1e-7, 1.0).log()
    kl = [(p * (torch.log(p.clamp_min(1e-12)) - log_mix)).sum(dim=1).mean() for p in probs]
    return weight * sum(kl) / len(kl)


__all__ = ["RANDCONV_CONSISTENCY_WEIGHT", "RANDCONV_KERNEL_SIZES", "consistency_loss", "randconv"]
