"""Semantic-aware random convolution (SRC) — SRCSM §1, batched on the training device.

SRC replaces the network input by a blend of random-network "restylings" of the whole image, one
fresh random network (RCNet) per label, each weighted by that label's smoothed mask::

    out = Σ_l RCNet_l(x) · m_l          (l = 0 … L-1, background included)

**RCNet** (SRCSM §1.1): four 3D convolutions, channels 1→2→2→2→1, each layer's kernel size drawn
independently from {1, 3}, weights N(0, 1) without fan-in scaling, bias 0, 'same' zero padding,
LeakyReLU(0.1) after every layer *including the last*; then ``y = α·h + (1-α)·x`` with α ~ U(0, 1)
and ``out = y / ‖y‖_F · ‖x‖_F`` (norms per sample, over the whole image). Bias 0 and leaky ReLU make
an RCNet positively homogeneous: ``RCNet(a·x) = a·RCNet(x)`` for a > 0.

**Batching.** All B·L networks of a batch run together: every layer is one grouped 3D convolution
(groups = number of networks), with 1³ kernels embedded as 3³ kernels that are zero off the centre —
mathematically the same convolution, so one code path serves every kernel-size pattern. On GPU the
first layer uses ``groups = B`` so the image is not copied L times; on CPU it reads one channels-last
copy per network, which oneDNN runs ~3× faster (``_common.expand_first_layer``). A Python loop over
labels (the reference's structure) is 4-7× slower on CPU; ``Testing/benchmarks/bench_src.py``
measures both.

**Rejection** (SRCSM §1.1, §8.3). The reference runs in fp16: a draw whose mixed output has
‖y‖_F > 65504 overflows, yields an all-zero image and is redrawn. We run in fp32 and reproduce the
accepted distribution explicitly: a draw whose ‖y‖_F is not finite, is 0, or exceeds ``reject_above``
(65504 by default) is rejected, and only the rejected networks are redrawn (up to ``max_rounds``).
:class:`RCNetStats` counts draws and rejections for logging. A sample whose image is all zeros has
nothing to restyle; it is returned unchanged (zeros) instead of being redrawn forever.

**Masks** (SRCSM §1.2): one-hot labels convolved per channel with a normalised 5³ Gaussian (σ = 1
voxel) with zero padding, as the reference. *Our departure:* the masks are then renormalised to sum
to one at every voxel, so the outer two voxels of the patch (where zero padding makes the sums < 1
and the reference darkens the image) keep the image's amplitude. In the interior the sums are already
one, so nothing changes there. ``smoothing=False`` uses the hard one-hot masks ("RCNetPLab").

Random draws are made on the generator's device (CPU by default) and moved to the image's device, so
a seed gives the same networks on CPU and GPU. SRC runs without gradients and outside autocast
(fp32), whatever the caller's context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import _common
from ._common import (GeneratorLike, as_generator, check_image, check_labels, frobenius, randint, randn,
                      separable_gaussian_3d, uniform)

#: Channels of the four RCNet layers (SRCSM §1.1: num_filters_base 2, last layer 1).
RCNET_CHANNELS = (1, 2, 2, 2, 1)
#: Kernel sizes each RCNet layer draws from, uniformly and independently.
RCNET_KERNEL_SIZES = (1, 3)
#: Slope of the leaky ReLU after every RCNet layer (the last one included).
RCNET_SLOPE = 0.1
#: Largest finite float16 value: the reference's fp16 overflow threshold for ‖y‖_F.
FP16_MAX = 65504.0
#: Mask smoothing: 5³ Gaussian, σ = 1 voxel.
MASK_SIGMA = 1.0
MASK_RADIUS = 2


@dataclass
class RCNetStats:
    """Running counts of RCNet draws; pass one to the SRC functions and log ``rejection_rate``.

    ``drawn`` counts every network sampled (accepted or not); ``rejected`` those thrown away. The
    reference rejects about 2.5 % (CT abdomen) to 6 % (MR heart) of its draws (SRCSM §8.3).
    """

    drawn: int = 0
    rejected: int = 0
    rounds: int = 0  # redraw rounds (0 when the first draw of a call was accepted)

    @property
    def accepted(self) -> int:
        return self.drawn - self.rejected

    @property
    def rejection_rate(self) -> float:
        return self.rejected / self.drawn if self.drawn else 0.0

    def reset(self) -> None:
        self.drawn = self.rejected = self.rounds = 0


@dataclass
class RCNetBank:
    """The parameters of ``n`` RCNets, laid out for grouped convolution.

    ``weights[i]`` has shape ``(n * c_out_i, c_in_i, 3, 3, 3)``: rows ``j*c_out_i … (j+1)*c_out_i - 1``
    belong to network ``j``; a layer whose kernel size is 1 has zeros off the kernel centre.
    ``kernel_sizes`` is ``(n, 4)`` in {1, 3}; ``alphas`` is ``(n,)`` in [0, 1).
    """

    kernel_sizes: torch.Tensor
    weights: list[torch.Tensor] = field(default_factory=list)
    alphas: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def n(self) -> int:
        return int(self.alphas.shape[0])

    @property
    def device(self) -> torch.device:
        return self.alphas.device

    def kernel(self, net: int, layer: int) -> torch.Tensor:
        """Network ``net``'s kernel of ``layer`` at its true size ``(c_out, c_in, k, k, k)``."""
        c_out = RCNET_CHANNELS[layer + 1]
        w = self.weights[layer][net * c_out:(net + 1) * c_out]
        if int(self.kernel_sizes[net, layer]) == 1:
            return w[:, :, 1:2, 1:2, 1:2]
        return w

    def select(self, index: torch.Tensor) -> "RCNetBank":
        """The networks ``index`` (a 1D integer tensor), as a new bank."""
        index = index.to(self.device)
        weights = []
        for layer, w in enumerate(self.weights):
            c_out = RCNET_CHANNELS[layer + 1]
            weights.append(w.view(self.n, c_out, *w.shape[1:])[index].reshape(-1, *w.shape[1:]))
        return RCNetBank(self.kernel_sizes[index], weights, self.alphas[index])

    def replace(self, index: torch.Tensor, other: "RCNetBank") -> None:
        """Overwrite networks ``index`` (in place) with the networks of ``other``, in order."""
        index = index.to(self.device)
        self.kernel_sizes[index] = other.kernel_sizes
        self.alphas[index] = other.alphas
        for layer, (w, w_new) in enumerate(zip(self.weights, other.weights)):
            c_out = RCNET_CHANNELS[layer + 1]
            w.view(self.n, c_out, *w.shape[1:])[index] = w_new.view(other.n, c_out, *w.shape[1:])


def draw_rcnets(n: int, generator: GeneratorLike = None, device: torch.device | str = "cpu") -> RCNetBank:
    """Sample ``n`` independent RCNets (SRCSM §1.1). Consumes a fixed amount of randomness per ``n``."""
    g = as_generator(generator)
    kernel_sizes = torch.tensor(RCNET_KERNEL_SIZES, device=device)[randint(len(RCNET_KERNEL_SIZES), (n, 4), g,
                                                                           device)]
    centre_only = torch.zeros(3, 3, 3, device=device)
    centre_only[1, 1, 1] = 1.0
    weights = []
    for layer in range(4):
        c_in, c_out = RCNET_CHANNELS[layer], RCNET_CHANNELS[layer + 1]
        w = randn((n, c_out, c_in, 3, 3, 3), g, device)
        is_1 = (kernel_sizes[:, layer] == 1).view(n, 1, 1, 1, 1, 1)
        w = torch.where(is_1, w * centre_only, w)  # a 1³ kernel is the centre tap of a 3³ one: N(0, 1) too
        weights.append(w.reshape(n * c_out, c_in, 3, 3, 3).contiguous())
    alphas = uniform((n,), 0.0, 1.0, g, device)
    return RCNetBank(kernel_sizes, weights, alphas)


def apply_rcnets(images: torch.Tensor, bank: RCNetBank,
                 nets_per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the bank on ``images (S, 1, D, H, W)``: networks ``s*k … s*k+k-1`` see image ``s``.

    Returns the mixed outputs ``y = α·h + (1-α)·x`` as ``(S, k, D, H, W)`` (not yet renormalised) and
    their Frobenius norms ``(S, k)``.
    """
    s, k = images.shape[0], nets_per_image
    if bank.n != s * k:
        raise ValueError(f"bank holds {bank.n} networks, expected {s} images × {k} = {s * k}")
    spatial = images.shape[2:]
    if _common.expand_first_layer(images.device):  # CPU: one channels-last copy per network
        x = images.expand(s, k, *spatial).reshape(1, s * k, *spatial)
        x, groups = x.contiguous(memory_format=torch.channels_last_3d), s * k
    else:
        x, groups = images.reshape(1, s, *spatial), s
    h = F.leaky_relu_(F.conv3d(x, bank.weights[0], padding=1, groups=groups), RCNET_SLOPE)
    for w in bank.weights[1:]:
        h = F.leaky_relu_(F.conv3d(h, w, padding=1, groups=s * k), RCNET_SLOPE)
    h = h.contiguous().view(s, k, *spatial)
    a = bank.alphas.view(s, k, 1, 1, 1)
    y = h.mul_(a).add_(images * (1.0 - a))  # (S,1,…) broadcasts over the k networks of each image
    norms = torch.linalg.vector_norm(y.flatten(2), dim=2)
    return y, norms


def _bad(norms: torch.Tensor, reject_above: float | None) -> torch.Tensor:
    bad = ~torch.isfinite(norms) | (norms == 0)
    if reject_above is not None:
        bad |= norms > reject_above
    return bad


@torch.no_grad()
def sample_rcnet_outputs(image: torch.Tensor, nets_per_image: int, generator: GeneratorLike = None, *,
                         stats: RCNetStats | None = None, reject_above: float | None = FP16_MAX,
                         max_rounds: int = 100) -> tuple[torch.Tensor, RCNetBank]:
    """``nets_per_image`` accepted, renormalised RCNet outputs per sample: ``(B, k, D, H, W)``.

    Output ``[b, j]`` is ``y / ‖y‖_F · ‖x_b‖_F`` of network ``b*k + j`` applied to the whole image
    ``b``. Rejected draws (see module docstring) are redrawn, only those. Also returns the bank of
    the accepted networks (for tests and inspection).
    """
    check_image(image)
    g = as_generator(generator)
    with torch.autocast(device_type=image.device.type, enabled=False):
        x = image.float()
        b, k = x.shape[0], nets_per_image
        x_norm = frobenius(x)
        if not bool(torch.isfinite(x_norm).all()):
            raise ValueError("SRC got an image with non-finite values (NaN or inf); check the loader and "
                             "the intensity normalisation")
        bank = draw_rcnets(b * k, g, x.device)
        y, y_norm = apply_rcnets(x, bank, k)
        y, y_norm = y.view(b * k, *x.shape[2:]), y_norm.view(b * k)
        owner = torch.arange(b, device=x.device).repeat_interleave(k)
        empty = (x_norm == 0)[owner]  # all-zero images stay zero: no draw can pass, none is needed
        bad = _bad(y_norm, reject_above) & ~empty
        n_drawn, n_rejected, rounds = b * k, 0, 0
        while True:
            idx = bad.nonzero().flatten()
            if idx.numel() == 0:
                break
            n_rejected += idx.numel()
            if rounds == max_rounds:
                raise RuntimeError(
                    f"every RCNet draw for {idx.numel()} network(s) was rejected {max_rounds} times (output "
                    f"norm not finite, zero or above {reject_above}); SRC expects normalised intensities of "
                    f"order 1 — is the image normalised?")
            rounds += 1
            new = draw_rcnets(idx.numel(), g, x.device)
            n_drawn += idx.numel()
            y_new, n_new = apply_rcnets(x[owner[idx]], new, 1)
            y[idx], y_norm[idx] = y_new[:, 0], n_new[:, 0]
            bank.replace(idx, new)
            bad = torch.zeros_like(bad)
            bad[idx] = _bad(n_new[:, 0], reject_above)
        if stats is not None:
            stats.drawn += n_drawn
            stats.rejected += n_rejected
            stats.rounds += rounds
        gain = torch.where(empty, torch.zeros_like(y_norm), x_norm[owner] / torch.where(empty, 1.0, y_norm))
        y.mul_(gain.view(-1, 1, 1, 1))
    return y.view(b, k, *x.shape[2:]), bank


@torch.no_grad()
def label_masks(labels: torch.Tensor, num_classes: int, smoothing: bool = True) -> torch.Tensor:
    """Blending masks ``(B, L, D, H, W)`` float32 that sum to one at every voxel.

    ``smoothing=True``: one-hot → per-channel 5³ Gaussian (σ = 1 voxel, zero padding, as SRCSM) →
    renormalised by the per-voxel sum (our departure; see the module docstring). ``False``: one-hot.
    """
    check_labels(labels)
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) (num_classes includes the background), "
                         f"got values in [{lo}, {hi}]; check num_classes or the label remapping")
    onehot = torch.zeros((labels.shape[0], num_classes, *labels.shape[1:]), device=labels.device)
    onehot.scatter_(1, labels.unsqueeze(1).long(), 1.0)
    if not smoothing:
        return onehot
    with torch.autocast(device_type=labels.device.type, enabled=False):
        masks = separable_gaussian_3d(onehot, MASK_SIGMA, MASK_RADIUS, padding="zeros")
    return masks.div_(masks.sum(dim=1, keepdim=True))


@torch.no_grad()
def semantic_random_convolution(image: torch.Tensor, labels: torch.Tensor, num_classes: int,
                                generator: GeneratorLike = None, smoothing: bool = True, *,
                                stats: RCNetStats | None = None, reject_above: float | None = FP16_MAX,
                                max_rounds: int = 100, return_bank: bool = False,
                                ) -> torch.Tensor | tuple[torch.Tensor, RCNetBank]:
    """SRC (``smoothing=True``, "RCNetPLabSm", the paper's default) or hard-mask SRC ("RCNetPLab").

    Args:
        image: ``(B, 1, D, H, W)`` float, normalised network input.
        labels: ``(B, D, H, W)`` int64 in ``[0, num_classes)`` — the (augmented) training labels.
        num_classes: L, background included. One RCNet per label per sample is drawn, also for
            labels absent from the patch (same randomness consumed whatever the patch contains).
        generator: ``torch.Generator`` or integer seed (``None``: fresh random seed).
        smoothing: Gaussian-smoothed, renormalised masks (True) or hard one-hot masks (False).
        stats: optional :class:`RCNetStats` to accumulate draw/rejection counts into.
        reject_above: ‖y‖_F threshold of the fp16-overflow rejection; ``None`` disables it.
        return_bank: also return the accepted :class:`RCNetBank` (network ``b*L + l`` = label l of
            sample b).

    Returns:
        ``(B, 1, D, H, W)`` float32 on the image's device (and the bank if ``return_bank``).
    """
    check_image(image)
    check_labels(labels, image)
    r, bank = sample_rcnet_outputs(image, num_classes, generator, stats=stats, reject_above=reject_above,
                                   max_rounds=max_rounds)
    masks = label_masks(labels, num_classes, smoothing)
    out = r.mul_(masks).sum(dim=1, keepdim=True)
    return (out, bank) if return_bank else out


@torch.no_grad()
def global_rcnet(image: torch.Tensor, generator: GeneratorLike = None, *, stats: RCNetStats | None = None,
                 reject_above: float | None = FP16_MAX, max_rounds: int = 100) -> torch.Tensor:
    """One RCNet per sample applied to the whole image — SRCSM's global ablation ("RCNet")."""
    out, _ = sample_rcnet_outputs(image, 1, generator, stats=stats, reject_above=reject_above,
                                  max_rounds=max_rounds)
    return out


__all__ = ["FP16_MAX", "RCNetBank", "RCNetStats", "apply_rcnets", "draw_rcnets", "global_rcnet",
           "label_masks", "sample_rcnet_outputs", "semantic_random_convolution"]
