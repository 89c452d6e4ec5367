"""Benchmark: training iterations per second of each CPU recipe, in fp32 and bf16.

Run on demand (not part of the test suite), from the repository root::

    python Testing/benchmarks/bench_training_throughput.py                  # every train/recipes/*_cpu.yaml
    python Testing/benchmarks/bench_training_throughput.py --iterations 8 --warmup 2 --recipes train/recipes/x.yaml
    python Testing/benchmarks/bench_training_throughput.py --compile --precisions bf16 --recipes train/recipes/x.yaml

Each recipe × precision runs in a fresh subprocess through the real trainer code path
(``train.trainer.Trainer.fit`` with ``until_iteration``): the recipe's own data cache, patch sampling,
appearance augmentation (SRC …), forward, loss, backward, Adam and EMA. Only ``Trainer.step`` is timed
(the first ``--warmup`` steps, which build oneDNN's primitives, are left out; validation and checkpoints
are pushed past the run). Reported: median seconds per step and its inverse, iterations per second. The
figure (``docs/figures/training_throughput.png``) and a Markdown table are written; the commit and any
uncommitted change under ``train/`` are named, since recipes change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(recipe: str, precision: str, iterations: int, warmup: int, cache: str, compile_network: bool = False) -> dict:
    import torch

    from train.config import load_config
    from train.trainer import Trainer

    class TimedTrainer(Trainer):
        """The real trainer; each step's wall time is recorded."""

        step_times: list[float] = []

        def build(self):
            super().build()
            if compile_network:  # torch.compile (Inductor) in place: the state dict's keys stay the network's
                self.model.compile()

        def step(self):
            t0 = time.perf_counter()
            out = super().step()
            self.step_times.append(time.perf_counter() - t0)
            return out

    end = warmup + iterations
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = load_config(recipe, {"precision": precision, "output_dir": out_dir, "cache_dir": cache,
                                   "val_every": 10 ** 9, "checkpoint_every": 10 ** 9, "log_every": 10 ** 9})
        cfg = cfg.resolve_paths(Path(recipe).parent)
        trainer = TimedTrainer(cfg, log=lambda m: None, overwrite=True)
        trainer.fit(until_iteration=end)
    times = trainer.step_times[warmup:]
    return {"recipe": Path(recipe).name, "precision": trainer.precision, "threads": torch.get_num_threads(),
            "batch_size": cfg.batch_size, "patch_size": list(cfg.patch_size), "augmentation": cfg.augmentation,
            "norm": cfg.network.get("parameters", {}).get("norm", "none"),
            "median_s": statistics.median(times), "min_s": min(times), "times": times, "compiled": compile_network,
            "first_step_s": trainer.step_times[0]}


def git_state() -> str:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace").stdout.strip()

    head = run("log", "-1", "--format=%h %s")
    dirty = run("status", "--porcelain", "--", "train")
    return f"commit {head[:90]}" + (f"; uncommitted under train/: {len(dirty.splitlines())} file(s)" if dirty else "")


def figure(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = sorted({r["recipe"] for r in rows})
    precisions = ["fp32", "bf16"]
    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=110)
    width = 0.38
    for p_i, prec in enumerate(precisions):
        vals = [next((1 / r["median_s"] for r in rows if r["recipe"] == rec and r["precision"] == prec), 0.0)
                for rec in recipes]
        bars = ax.bar([i + (p_i - 0.5) * width for i in range(len(recipes))], vals, width, label=prec)
        for bar, v in zip(bars, vals):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.2f}" if v else "n/a", ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(range(len(recipes)))
    ax.set_xticklabels([r.replace(".yaml", "").replace("_src", "") for r in recipes], fontsize=7, rotation=12)
    ax.set_ylabel("iterations / s")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)  # atomic: never a half-written figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=None, help="default: train/recipes/*_cpu.yaml")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--iterations", type=int, default=6, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cache", default=str(ROOT / "cache"), help="the trainer's data cache (reused)")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "training_throughput.png")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (the first warm-up step compiles; no figure is written)")
    parser.add_argument("--child", nargs=6, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        recipe, precision, iterations, warmup, cache, compiled = args.child
        print("RESULT " + json.dumps(child(recipe, precision, int(iterations), int(warmup), cache, compiled == "1")))
        return

    import bench_matching as bm

    recipes = args.recipes or sorted(str(p) for p in (ROOT / "train" / "recipes").glob("*_cpu.yaml"))
    state = git_state()
    rows = []
    for recipe in recipes:
        for precision in args.precisions:
            proc = subprocess.run([sys.executable, __file__, "--child", recipe, precision, str(args.iterations),
                                   str(args.warmup), args.cache, "1" if args.compile else "0"], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace")
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{recipe} {precision}: failed\n{proc.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(line[len("RESULT "):])
            r["requested"] = precision
            rows.append(r)
            print(f"{r['recipe']} {precision}: {1 / r['median_s']:.3f} it/s (median {r['median_s']:.2f} s/step)",
                  flush=True)

    machine = bm.machine_line()
    print()
    print(machine)
    print(f"Training code: {state}. GPU: not measured (no GPU in this session).")
    print()
    print("| recipe | network norm | augmentation | batch × patch | precision | s / iteration (median, min) "
          "| iterations / s | 1 000 iterations |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        prec = r["precision"] + ("" if r["precision"] == r["requested"] else f" (asked {r['requested']})")
        if r["compiled"]:
            prec += f", torch.compile (first step {r['first_step_s']:.0f} s)"
        print(f"| {r['recipe']} | {r['norm']} | {r['augmentation']} | {r['batch_size']} × "
              f"{'×'.join(map(str, r['patch_size']))} | {prec} | {r['median_s']:.2f} s ({r['min_s']:.2f} s) "
              f"| {1 / r['median_s']:.3f} | {1000 * r['median_s'] / 60:.0f} min |")
    if rows and not args.compile:
        figure(rows, args.figure, f"Training throughput, CPU ({rows[0]['threads']} threads), "
               f"{time.strftime('%Y-%m-%d')} — {state.split(';')[0][:60]}")
        print(f"\nfigure: {args.figure.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
