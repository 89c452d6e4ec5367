"""Segmentation networks, built from the ``network`` section of a model package.

``srcsm_unet`` is the SRCSM U-Net (§4.1): ``len(channels)`` levels, two 3³ convolutions per block with
LeakyReLU(0.1) and dropout, no normalisation layers, average pooling down, trilinear ×2 up,
concatenation ``[skip, upsampled]``, a 1³ head. The paper uses ``channels = [64]*5``; a lighter
``[16, 32, 64, 128, 256]`` variant is what fits CPU budgets. One definition, used by ``train``, the
CLI and the Slicer module.

``norm="instance"`` (recipe v2, a recorded departure from the paper) puts an affine instance
normalisation after every 3³ convolution, before the activation, as nnU-Net does. Without it the
paper's network let its logits grow to 10³–10⁷ on our CPU budgets and six of seven CT runs under the
generalised Dice loss fell dead (one class everywhere, no gradient; docs/benchmarks.md): normalised
activations keep the logits bounded. Packages without the parameter are the paper's plain network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("srcsm_unet",)
NORMS = ("none", "instance")


class _Block(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, dropout: float, repeats: int = 2, norm: str = "none") -> None:
        layers: list[nn.Module] = []
        for r in range(repeats):
            layers.append(nn.Conv3d(c_in if r == 0 else c_out, c_out, 3, padding=1))
            if norm == "instance":
                layers.append(nn.InstanceNorm3d(c_out, affine=True, eps=1e-5))
            layers.append(nn.LeakyReLU(0.1, inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class SRCSMUNet(nn.Module):
    """3D U-Net of the SRCSM paper (plain: no normalisation layers; ``norm="instance"``: recipe v2)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 5,
                 channels: tuple[int, ...] | list[int] = (64, 64, 64, 64, 64), dropout: float = 0.1,
                 norm: str = "none") -> None:
        super().__init__()
        channels = list(channels)
        if len(channels) < 2:
            raise ValueError("a U-Net needs at least two levels")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        self.levels = len(channels)
        self.norm = norm
        self.down = nn.ModuleList()
        c_prev = in_channels
        for c in channels:
            self.down.append(_Block(c_prev, c, dropout, norm=norm))
            c_prev = c
        # deepest level: its expanding block runs right after its contracting block (4 convs in a row)
        self.bottom = _Block(channels[-1], channels[-1], dropout, norm=norm)
        self.up = nn.ModuleList()
        for lvl in range(self.levels - 2, -1, -1):
            self.up.append(_Block(channels[lvl] + channels[lvl + 1], channels[lvl], dropout, norm=norm))
        self.head = nn.Conv3d(channels[0], out_channels, 1)
        self.reset_parameters()

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (one halving per pooling)."""
        return 2 ** (self.levels - 1)

    def reset_parameters(self) -> None:
        """He truncated-normal init (VarianceScaling(2, fan_in, truncated_normal)), zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                fan_in = m.in_channels * math.prod(m.kernel_size)
                std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.avg_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        x = self.bottom(x)
        for i, block in enumerate(self.up):
            skip = skips[self.levels - 2 - i]
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return self.head(x).float()

    def conv_kernels(self) -> list[torch.Tensor]:
        """The 3³ kernels the paper's L2 regulariser applies to (not biases, not the head)."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Conv3d) and m is not self.head]


def build_network(architecture: str, parameters: dict[str, Any]) -> nn.Module:
    """Instantiate a network from a model package's ``network`` section."""
    if architecture == "srcsm_unet":
        return SRCSMUNet(**parameters)
    raise ValueError(f"unknown architecture '{architecture}'; known: {', '.join(ARCHITECTURES)}")


def network_divisor(module: nn.Module) -> int:
    return int(getattr(module, "divisor", 1))


def spec_divisor(architecture: str, parameters: dict[str, Any]) -> int:
    """What input sizes must be multiples of, from a package's ``network`` section (no weights built)."""
    if architecture == "srcsm_unet":
        levels = len(parameters.get("channels", (64, 64, 64, 64, 64)))
        return 2 ** (levels - 1)
    raise ValueError(f"unknown architecture '{architecture}'; known: {', '.join(ARCHITECTURES)}")
