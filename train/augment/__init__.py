"""Training-time augmentation on the training device, batched: SRC and the baselines.

Appearance augmentations (chosen by name in a recipe, applied by the trainer after the spatial and
intensity augmentation, on the GPU, without gradients):

=================  ==========================================================================
name               what
=================  ==========================================================================
``none``           the image unchanged (baseline: spatial + intensity augmentation only)
``src``            SRC, SRCSM's default ("RCNetPLabSm"): one RCNet per label, smoothed masks
``src_hard``       SRC with hard one-hot masks ("RCNetPLab")
``rcnet_global``   one RCNet for the whole image ("RCNet", the RandConv-style ablation)
``randconv``       RandConv RC_mix (Xu et al., ICLR 2021), one random layer per sample
``gin``            GIN (Ouyang et al., TMI 2022), one view
``gin_ipa``        GIN-IPA: **returns a tuple of three views** ``(a, b, c)`` — see below
=================  ==========================================================================

Trainer contract (:func:`apply_appearance`):

* every name but ``gin_ipa`` returns one ``(B, 1, D, H, W)`` float32 tensor;
* ``gin_ipa`` returns ``(a, b, c)`` (:func:`num_views` = 3): forward ``torch.cat([a, b, c])``, put
  the segmentation loss on the logits of ``a`` only, and add
  :func:`train.augment.gin.consistency_loss` ``(logits_a, logits_b, logits_c)`` (λ = 10 built in) —
  their recipe, see :mod:`train.augment.gin`;
* the labels are never changed by appearance augmentation (SRC and src_hard only read them).

Also here: :mod:`~train.augment.spatial` (``random_spatial``), :mod:`~train.augment.intensity`
(``random_intensity``), and :class:`~train.augment.src.RCNetStats` to log SRC's rejection rate.
All functions accept a ``torch.Generator`` or an integer seed; draws are made on the generator's
device (CPU by default), so a seed gives the same augmentation on CPU and GPU.
"""

from __future__ import annotations

import torch

from ._common import GeneratorLike, as_generator
# Submodules ``gin`` and ``randconv`` stay reachable as modules (``train.augment.gin.gin``): their
# same-named functions are deliberately not re-exported here, which would shadow the modules.
from . import gin, intensity, randconv, spatial, src
from .gin import consistency_loss as gin_consistency_loss
from .gin import gin_ipa, ipa_field
from .intensity import random_intensity
from .randconv import consistency_loss as randconv_consistency_loss
from .spatial import SpatialParams, random_spatial, sample_spatial_params, spatial_transform
from .src import RCNetBank, RCNetStats, draw_rcnets, global_rcnet, label_masks, semantic_random_convolution

#: The appearance augmentations a recipe may name, with a one-line description each.
AUGMENTATIONS: dict[str, str] = {
    "none": "no appearance augmentation (spatial + intensity only)",
    "src": "semantic-aware random convolution, smoothed masks (SRCSM default)",
    "src_hard": "semantic-aware random convolution, hard masks (RCNetPLab ablation)",
    "rcnet_global": "one RCNet for the whole image (RCNet ablation)",
    "randconv": "RandConv RC_mix, kernel sizes {1,3,5,7} (Xu et al. 2021)",
    "gin": "GIN, one view (Ouyang et al. 2022)",
    "gin_ipa": "GIN-IPA, three views + consistency loss (Ouyang et al. 2022)",
}


def num_views(name: str) -> int:
    """How many views :func:`apply_appearance` returns for ``name`` (3 for ``gin_ipa``, else 1)."""
    _check_name(name)
    return 3 if name == "gin_ipa" else 1


def _check_name(name: str) -> None:
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown appearance augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}")


@torch.no_grad()
def apply_appearance(name: str, image: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     generator: GeneratorLike = None, *, stats: RCNetStats | None = None,
                     ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Apply appearance augmentation ``name`` to ``image (B, 1, D, H, W)``.

    ``labels (B, D, H, W)`` int64 and ``num_classes`` (background included) are used by the SRC
    variants only. ``stats`` accumulates RCNet draw/rejection counts (SRC variants). Returns a
    float32 tensor of the image's shape, or for ``gin_ipa`` a tuple of three (see the module doc).
    """
    _check_name(name)
    g = as_generator(generator)
    if name == "none":
        return image.float()
    if name == "src":
        return semantic_random_convolution(image, labels, num_classes, g, smoothing=True, stats=stats)
    if name == "src_hard":
        return semantic_random_convolution(image, labels, num_classes, g, smoothing=False, stats=stats)
    if name == "rcnet_global":
        return global_rcnet(image, g, stats=stats)
    if name == "randconv":
        return randconv.randconv(image, g)
    if name == "gin":
        return gin.gin(image, g)
    return gin_ipa(image, g)


__all__ = ["AUGMENTATIONS", "RCNetBank", "RCNetStats", "SpatialParams", "apply_appearance", "draw_rcnets",
           "gin", "gin_consistency_loss", "gin_ipa", "global_rcnet", "intensity", "ipa_field", "label_masks",
           "num_views", "randconv", "randconv_consistency_loss", "random_intensity", "random_spatial",
           "sample_spatial_params", "semantic_random_convolution", "spatial", "spatial_transform", "src"]
