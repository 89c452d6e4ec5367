"""Is a dead training run dead for good? Look at what its checkpoint's network outputs.

A run whose loss sits at the generalised Dice ceiling with a vanishing gradient norm (the trainer's
dead-episode warning, :class:`train.trainer.DeadEpisodeMonitor`) predicts one class everywhere. Whether it
can come back depends on *how* saturated its softmax is: with logit gaps of tens, a lucky batch can still
push a gradient through; with gaps beyond ≈ 104 every other class's float32 softmax underflows to exactly
0 and the segmentation loss has exactly no gradient — all that is left is the L2 penalty's, which Adam
turns into updates far too small to shrink the weights back within any budget. This module measures that
on training patches (the run's own cache and sampler, no augmentation) so the decision to stop, rerun
with another seed or change the loss rests on numbers, not on a hunch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from SRCSMSegmenterLib.errors import InputError

#: Top-two logit gap beyond which float32 softmax puts exactly 0 on every other class
#: (exp(-gap) below the smallest float32 subnormal, 2⁻¹⁴⁹), so the loss has no gradient there.
UNDERFLOW_GAP = 149 * math.log(2)
#: What healthy trained runs of the ablation showed (4 training patches, optimiser's weights, 2026-12-01):
#: the U-Net has no normalisation layers and its logits grow to thousands under either loss, so most
#: voxels are exactly one-hot even when all is well; the gradient comes from the few uncertain ones.
HEALTHY_ONE_HOT = "85–99 % (median top-two gaps 600–3 200)"


def saturation_report(run_dir: str | Path, weights: str = "raw", patches: int = 4, seed: int = 0,
                      device: str = "cpu") -> dict[str, Any]:
    """Logit statistics of the checkpoint in ``run_dir`` on ``patches`` training patches.

    ``weights``: ``"raw"`` (the optimiser's, what trains on) or ``"ema"`` (what export packages) — the
    vocabulary of ``export``; ``"model"`` (the checkpoint's group name) is accepted as ``"raw"``.
    Returns iteration, weights, logit range, median and minimum top-two gap, the share of voxels with an
    exactly one-hot float32 softmax (no gradient), the share of voxels per predicted class, the weights'
    L2 norm and the gradient norm of the L2 penalty alone (what a dead run logs), and a one-line verdict.
    """
    from .config import TrainConfig
    from .trainer import CHECKPOINT_STATE, PatchSampler, Trainer, load_checkpoint

    run_dir = Path(run_dir)
    weights = "raw" if weights == "model" else weights
    if weights not in ("raw", "ema"):
        raise InputError(f"weights must be 'raw' or 'ema', got {weights!r}")
    if not (run_dir / CHECKPOINT_STATE).is_file():
        raise InputError(f"{run_dir} holds no training checkpoint ({CHECKPOINT_STATE}); give the run's "
                                f"output folder (the recipe's output_dir)")
    if patches < 1:
        raise InputError(f"patches must be at least 1, got {patches}")
    groups, state = load_checkpoint(run_dir)
    cfg = TrainConfig.model_validate(state["config"] | {"device": device, "output_dir": str(run_dir)})
    if not (Path(cfg.dataset) / "dataset.json").is_file():
        raise InputError(f"the run's training data, {cfg.dataset} (as its configuration names it), is not found "
                         f"from {Path.cwd()}: run this from the folder the training ran in (relative paths are "
                         f"resolved there)")
    trainer = Trainer(cfg, resume=False, log=lambda _m: None)
    trainer.prepare_data()
    trainer.build()
    model = trainer.model.float().to(memory_format=torch.contiguous_format)
    group = "ema" if weights == "ema" else "model"  # the checkpoint's group names
    model.load_state_dict({k: v.to(trainer.device) for k, v in groups[group].items()})
    model.eval()
    sampler = PatchSampler(trainer.train_data, trainer.patch_kji, cfg.foreground_oversampling,
                           np.random.default_rng(seed), cfg.landmark_sampling)
    lo, hi, gaps, one_hot, counts, n = math.inf, -math.inf, [], 0, None, 0
    with torch.no_grad(), torch.autocast(device_type=trainer.device.type, enabled=False):
        for _ in range(patches):
            img = sampler.sample(1)[0]
            logits = model(torch.from_numpy(img).float().to(trainer.device))
            lo, hi = min(lo, float(logits.min())), max(hi, float(logits.max()))
            top2 = logits.topk(2, dim=1).values
            gaps.append((top2[:, 0] - top2[:, 1]).flatten().cpu())
            probs = torch.softmax(logits, dim=1)
            others_zero = (probs == 0).sum(dim=1) == probs.shape[1] - 1
            one_hot += int(((probs.max(dim=1).values == 1.0) & others_zero).sum())
            c = torch.bincount(logits.argmax(dim=1).flatten().cpu(), minlength=logits.shape[1])
            counts = c if counts is None else counts + c
            n += logits[:, 0].numel()
    gap = torch.cat(gaps)
    with torch.no_grad():
        w_norm = float(torch.sqrt(sum((k.float() ** 2).sum() for k in model.conv_kernels())))
    share = one_hot / n
    class_share = {str(i): float(c) / n for i, c in enumerate(counts.tolist())}
    report = {
        "run_dir": str(run_dir), "iteration": int(state["iteration"]), "weights": weights, "patches": patches,
        "logit_min": lo, "logit_max": hi, "gap_median": float(gap.median()), "gap_min": float(gap.min()),
        "one_hot_share": share, "class_share": class_share,
        "kernel_norm": w_norm, "l2_gradient_norm": 2.0 * cfg.l2 * w_norm,
    }
    report["verdict"] = _verdict(report)
    return report


def _verdict(r: dict[str, Any]) -> str:
    share, single = r["one_hot_share"], max(r["class_share"].values()) >= 0.999
    if share >= 0.999 and single:
        verdict = (f"dead for good: one class everywhere with an exactly one-hot softmax at {share:.1%} of the voxels "
                   f"(top-two logit gap ≥ {r['gap_min']:.3g}), so the segmentation loss has no gradient and only "
                   f"the L2 penalty trains (gradient norm {r['l2_gradient_norm']:.3g}); it will not recover — "
                   f"rerun with another seed or with `loss: gdl_ce`")
    elif share >= 0.999:
        verdict = (f"saturated: an exactly one-hot softmax at {share:.1%} of the voxels, though not one class "
                   f"everywhere; the segmentation loss has (almost) no gradient on these patches")
    elif share > 0.5:
        verdict = (f"not dead: an exactly one-hot softmax at {share:.1%} of the voxels (usual for this network: "
                   f"its healthy trained runs show {HEALTHY_ONE_HOT}), and the rest carry the gradient")
    else:
        verdict = f"not saturated: an exactly one-hot softmax at {share:.1%} of the voxels"
    if r["weights"] == "ema":
        verdict += " (EMA weights: they do not train; this is what `export` would package)"
    return verdict
def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines (the CLI's output)."""
    classes = ", ".join(f"{k}: {v:.1%}" for k, v in report["class_share"].items())
    return "\n".join([
        f"{report['run_dir']} — checkpoint at iteration {report['iteration']}, {report['weights']} weights, "
        f"{report['patches']} training patches",
        f"logits from {report['logit_min']:.4g} to {report['logit_max']:.4g}; top-two gap median "
        f"{report['gap_median']:.4g}, min {report['gap_min']:.4g} (float32 softmax underflows beyond "
        f"{UNDERFLOW_GAP:.1f})",
        f"predicted classes (share of voxels): {classes}",
        f"kernel norm {report['kernel_norm']:.4g}; gradient norm of the L2 penalty alone "
        f"{report['l2_gradient_norm']:.3g}",
        report["verdict"],
    ])


__all__ = ["HEALTHY_ONE_HOT", "UNDERFLOW_GAP", "format_report", "saturation_report"]
