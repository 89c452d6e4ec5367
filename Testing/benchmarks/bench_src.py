"""Benchmark: batched SRC vs. a per-label loop of small convolutions vs. one U-Net training step.

Run on demand (not part of the test suite)::

    python Testing/benchmarks/bench_src.py                 # both patch sizes, every device found
    python Testing/benchmarks/bench_src.py --sizes 80,64,80 --repeats 5 --device cpu

For each patch size (D, H, W) and device it times, with 5 labels (background included):

* ``src batched`` — :func:`train.augment.semantic_random_convolution` (grouped convolutions);
* ``src loop`` — the straightforward port: a Python loop over labels, one RCNet at a time with its
  true 1³/3³ kernels (four ``conv3d`` calls each), the same rejection rule, and a full 5³ Gaussian
  mask convolution;
* ``unet step fp32`` / ``unet step bf16`` — one training step (forward, cross-entropy, backward, Adam
  step) of ``SRCSMUNet(channels=[16, 32, 64, 128, 256], out_channels=5)``; the bf16 row uses
  ``torch.autocast(dtype=torch.bfloat16)`` and ``channels_last_3d`` model and input.

and prints a Markdown table (median seconds over ``--repeats`` runs after one warm-up) headed by the
machine and date. SRC's share of a step is what decides whether the augmentation is worth batching.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from SRCSMSegmenterLib.network import SRCSMUNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_matching import cpu_name  # noqa: E402  (one /proc reader for all benchmarks)
from train import augment
from train.augment import semantic_random_convolution
from train.augment._common import gaussian_kernel_1d
from train.augment.src import FP16_MAX

NUM_CLASSES = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocator, cuDNN autotuning, lazy init)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _phantom(shape: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised image in [-1, 1] with four ellipsoid organs, and its 5-class label map."""
    d, h, w = shape
    zz, yy, xx = torch.meshgrid(torch.linspace(-1, 1, d), torch.linspace(-1, 1, h), torch.linspace(-1, 1, w),
                                indexing="ij")
    labels = torch.zeros(shape, dtype=torch.long)
    image = torch.full(shape, -0.9)
    body = (xx ** 2 + (yy / 0.8) ** 2 + zz ** 2) < 0.9
    image[body] = 0.0
    organs = [((-0.3, 0.0, 0.2), 0.35), ((0.35, 0.1, 0.0), 0.15), ((-0.35, 0.1, -0.3), 0.15),
              ((0.3, -0.2, 0.3), 0.2)]
    for label, ((cx, cy, cz), r) in enumerate(organs, start=1):
        inside = ((xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2) < r ** 2
        labels[inside] = label
        image[inside] = 0.15 * label
    image += 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return image[None, None].to(device), labels[None].to(device)


def src_loop(image: torch.Tensor, labels: torch.Tensor, num_classes: int, generator: torch.Generator,
             ) -> torch.Tensor:
    """The unbatched port: per sample, per label, draw and apply one RCNet with small convolutions."""
    dev = image.device
    k1 = gaussian_kernel_1d(1.0, 2, dev)
    k3 = (k1[:, None, None] * k1[None, :, None] * k1[None, None, :]).expand(num_classes, 1, 5, 5, 5)
    onehot = F.one_hot(labels, num_classes).permute(0, 4, 1, 2, 3).float()
    masks = F.conv3d(onehot, k3, padding=2, groups=num_classes)
    masks = masks / masks.sum(1, keepdim=True)
    out = torch.zeros_like(image)
    for b in range(image.shape[0]):
        x = image[b:b + 1]
        x_norm = x.norm()
        for label in range(num_classes):
            while True:
                ks = [1 + 2 * int(torch.randint(2, (1,), generator=generator)) for _ in range(4)]
                chans = (1, 2, 2, 2, 1)
                h = x
                for i, k in enumerate(ks):
                    w = torch.randn(chans[i + 1], chans[i], k, k, k, generator=generator).to(dev)
                    h = F.leaky_relu(F.conv3d(h, w, padding=k // 2), 0.1)
                a = float(torch.rand(1, generator=generator))
                y = a * h + (1 - a) * x
                n = y.norm()
                if torch.isfinite(n) and 0 < float(n) <= FP16_MAX:
                    break
            out[b] += (y / n * x_norm)[0] * masks[b, label]
    return out


def unet_step(shape: tuple[int, int, int], device: torch.device, bf16: bool) -> Callable[[], object]:
    torch.manual_seed(0)
    model = SRCSMUNet(channels=[16, 32, 64, 128, 256], out_channels=NUM_CLASSES).to(device)
    x, y = _phantom(shape, device)
    if bf16:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["80,64,80", "160,128,160"], help="patch sizes D,H,W")
    parser.add_argument("--device", nargs="+", default=None,
                        help="devices (default: cpu, and cuda if present)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-unet", action="store_true", help="do not time the U-Net step")
    parser.add_argument("--baselines", action="store_true",
                        help="also time randconv, gin, gin_ipa and the spatial augmentation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rows = []
    for dev_name in devices:
        device = torch.device(dev_name)
        for size in args.sizes:
            shape = tuple(int(v) for v in size.split(","))
            image, labels = _phantom(shape, device)
            g = torch.Generator().manual_seed(0)
            timings = {
                "src batched": _time(lambda: semantic_random_convolution(image, labels, NUM_CLASSES, g),
                                     device, args.repeats),
                "src loop": _time(lambda: src_loop(image, labels, NUM_CLASSES, g), device, args.repeats),
            }
            if args.baselines:
                timings["randconv"] = _time(lambda: augment.randconv.randconv(image, g), device, args.repeats)
                timings["gin"] = _time(lambda: augment.gin.gin(image, g), device, args.repeats)
                timings["gin_ipa (3 views)"] = _time(lambda: augment.gin_ipa(image, g), device, args.repeats)
                crop = _phantom(tuple(int(round(v * 1.25 / 2)) * 2 for v in shape), device)
                timings["spatial (1.25× crop)"] = _time(
                    lambda: augment.random_spatial(crop[0], crop[1], shape, (2.4, 2.4, 2.4), g,
                                                   num_classes=NUM_CLASSES), device, args.repeats)
            if not args.skip_unet:
                for name, bf16 in (("unet step fp32", False), ("unet step bf16", True)):
                    try:
                        timings[name] = _time(unet_step(shape, device, bf16), device, args.repeats)
                    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # e.g. out of memory
                        print(f"{name} on {dev_name} {shape}: {err}")
                        timings[name] = float("nan")
            rows.append((dev_name, shape, timings))
            print(dev_name, shape, {k: round(v, 4) for k, v in timings.items()}, flush=True)

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print()
    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads, GPU: {gpu}; "
          f"torch {torch.__version__}; {datetime.date.today().isoformat()}; "
          f"median of {args.repeats} after a warm-up; 5 labels, batch 1")
    print()
    names = list(rows[0][2])
    unet = "unet step fp32" in names
    header = "| device | patch (D×H×W) | " + " | ".join(f"{n} (s)" for n in names) + " | loop / batched |"
    print(header + (" batched / fp32 step | batched / bf16 step |" if unet else ""))
    print("|---" * (len(names) + 3 + 2 * unet) + "|")
    for dev_name, shape, t in rows:
        cells = " | ".join(f"{t[n]:.3f}" for n in names)
        ratio = t["src loop"] / t["src batched"]
        share = ""
        if unet:
            fp32, bf16 = t["src batched"] / t["unet step fp32"], t["src batched"] / t["unet step bf16"]
            share = f" {fp32:.1%} | {bf16:.1%} |"
        print(f"| {dev_name} | {'×'.join(map(str, shape))} | {cells} | {ratio:.2f}× |{share}")


if __name__ == "__main__":
    main()
