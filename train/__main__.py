"""``python -m train`` (or ``srcsm-train``): fit, export and evaluate SRCSM models.

Examples::

    python -m train fit train/recipes/abdomen_ct_src_cpu.yaml            # train (checkpoints in output_dir)
    python -m train fit RECIPE --resume --time-limit 3000                 # continue a run for 50 min
    torchrun --nproc_per_node 2 -m train fit RECIPE                       # data-parallel (gloo/NCCL)
    python -m train export runs/abdomen-ct-src models/my-abdomen-ct --id my-abdomen-ct
    python -m train evaluate models/my-abdomen-ct ../shared/data/Dataset502_AbdomenMRT2 --out eval/ct2mr
    python -m train card-metrics cross_domain_mr=eval/ct2mr --note "…" --out metrics.json
    python -m train card-metrics cross_domain_mr=eval/ct2mr --note "…" --write-card models/my-abdomen-ct
    python -m train diagnose runs/abdomen-ct-src                          # is a dead run dead for good?
    python -m train robustness Resources/Models/abdomen-ct-srcsm ../shared/data/Dataset501_AbdomenCT --out rob/ct
    python -m train robustness --report rob/ct rob/ct2mr --markdown docs/robustness.md
    python -m train choose-postprocessing Resources/Models/abdomen-ct-srcsm ../shared/data/Dataset501_AbdomenCT
    python -m train choose-padding Resources/Models/abdomen-mr-srcsm ../shared/data/Dataset502_AbdomenMRT2 --out runs/pad/mr
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from SRCSMSegmenterLib.errors import CancelledError, SRCSMError
from SRCSMSegmenterLib.postprocess import add_arguments as add_postprocess_arguments


def _parse_override(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE (YAML value), got '{item}'")
        key, value = item.split("=", 1)
        import yaml

        out[key] = yaml.safe_load(value)
    return out


def _weights_choice(value: str) -> str:
    """One vocabulary for which weights of a checkpoint: ``ema`` or ``raw`` (the optimiser's). ``model``
    (the checkpoint's group name, once diagnose's spelling) is still accepted, with a note."""
    value = value.lower()
    if value == "model":
        print("note: --weights model is deprecated; it means --weights raw (the optimiser's weights)", file=sys.stderr)
        return "raw"
    if value not in ("ema", "raw"):
        raise argparse.ArgumentTypeError(f"invalid choice: '{value}' (choose ema or raw)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="train a model from a recipe (YAML/TOML); resumable")
    f.add_argument("config", help="recipe file, e.g. train/recipes/abdomen_ct_src_cpu.yaml")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set iterations=2000 --set augmentation=none")
    f.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    f.add_argument("--run-dir", default=None, metavar="DIR",
                   help="train into this folder instead of the recipe's output_dir")
    f.add_argument("--overwrite", action="store_true",
                   help="start afresh where a run exists (the old run is kept, renamed to DIR.replaced-<time>)")
    f.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="checkpoint and stop after this many seconds (resume later with --resume)")
    f.add_argument("--until", type=int, default=None, metavar="ITERATION", help="stop at this iteration")

    c = sub.add_parser("cache", help="only build the preprocessing cache of a recipe")
    c.add_argument("config")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    e = sub.add_parser("export", help="write a model package (folder or .zip) from a run's checkpoint")
    e.add_argument("run_dir")
    e.add_argument("destination", help="package folder, or a path ending in .zip")
    e.add_argument("--metrics", help="JSON file of measured metrics to put in the model card")
    e.add_argument("--performance", help="JSON file of measured time/memory for the model card")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--weights-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage type of the weights (float16 halves the package; loaded as float32)")
    e.add_argument("--id", dest="model_id", default=None,
                   help="model id in the card (default: the run folder's name + '-it<iteration>'); a bundled "
                        "model's id is refused unless --replace-bundled")
    e.add_argument("--version", default=None, help="model version in the card (default: 0.0.0-it<iteration>)")
    e.add_argument("--replace-bundled", action="store_true",
                   help="allow a bundled model's id or folder (only to release a new version of that model)")
    e.add_argument("--weights", type=_weights_choice, default="ema", metavar="{ema,raw}",
                   help="EMA weights (default) or the optimiser's current ones (after a late change of objective)")
    e.add_argument("--description", default=None, help="model card description (default: the recipe's)")

    v = sub.add_parser("evaluate", help="segment a labelled dataset, with and without source matching, and report")
    v.add_argument("model", help="model package path or catalogue id")
    v.add_argument("dataset", help="nnU-Net raw dataset folder (target domain)")
    v.add_argument("--split", default="all", help="split of splits.json to evaluate (default: all cases)")
    v.add_argument("--out", required=True, help="output folder for CSV, Markdown and PNG figures")
    v.add_argument("--sm", choices=["both", "on", "off"], default="both", help="source matching settings")
    v.add_argument("--device", default="auto")
    v.add_argument("--limit", type=int, default=None, help="evaluate only the first N cases")
    add_postprocess_arguments(v, "each prediction, as `srcsm segment` applies it (card: what a user gets; none: "
                                 "the network's own labels)")
    v.add_argument("--padding-mode", choices=["card", "constant", "replicate"], default="card",
                   help="how the network input is padded where the model grid is smaller than the window: card (the default: the model card's inference.padding_mode, what every front end does), constant or replicate (experiments: docs/benchmarks.md \"Padding a thin scan\"; a padding other than the card's never goes into a card)")
    v.add_argument("--landmark", action="store_true",
                   help="also evaluate inside the paper's ground-truth-centred ROI (measures the cost of our "
                        "whole-volume sliding window; not a clinical setting)")
    m = sub.add_parser("card-metrics", help="model-card metrics (JSON for export --metrics) from evaluations")
    m.add_argument("entries", nargs="+", metavar="KEY=EVAL_DIR",
                   help="card key and the folder `evaluate --out` wrote, e.g. cross_domain_mr_chaos_all20=eval/ct2mr")
    m.add_argument("--note", default=None, help="a sentence on budget and protocol for the card")
    m.add_argument("--out", default=None, help="JSON file to write (for export --metrics)")
    m.add_argument("--write-card", default=None, metavar="PACKAGE",
                   help="write the metrics into this package folder's model card (only its metrics field changes)")
    d = sub.add_parser("diagnose", help="logit saturation of a run's checkpoint on training patches: whether a "
                                        "run that fell dead (loss at its ceiling, no gradient) can recover")
    d.add_argument("run_dir", help="the run's output folder (holds checkpoint.json)")
    d.add_argument("--weights", type=_weights_choice, default="raw", metavar="{raw,ema}",
                   help="the optimiser's weights (raw, default: what trains) or the EMA (what export packages); "
                        "'model' is the deprecated spelling of raw")
    d.add_argument("--patches", type=int, default=4, help="training patches to look at (default 4)")
    d.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    r = sub.add_parser("release", help="export a finished run as a new model version and measure everything its "
                                       "card and the docs need, into a staging folder (resumable); --install "
                                       "then replaces the bundled package")
    r.add_argument("run_dir", help="the finished run's output folder")
    r.add_argument("--version", required=True, help="the new version, e.g. 0.3.0")
    r.add_argument("--cross-domain", required=True, metavar="DATASET", help="the other domain's labelled dataset")
    r.add_argument("--cross-split", default="all", help="its split to evaluate (default: all)")
    r.add_argument("--in-domain-split", default=None,
                   help="own dataset's split for the in-domain score (default: test, or the validation split "
                        "where there is no test split)")
    r.add_argument("--choose-split", default=None, help="own split that chooses strategy and clean-up (default: "
                                                         "the recipe's validation split)")
    r.add_argument("--staging", default=None, help="staging folder (default runs/release/<id>-<version>)")
    r.add_argument("--robustness-cases", type=int, default=3)
    r.add_argument("--perturbations", default=None, help="comma-separated robustness perturbations (default: all)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--allow-unfinished", action="store_true", help="release a run before its last iteration")
    r.add_argument("--install", action="store_true",
                   help="after measuring, replace the bundled package of this id with the staged one")
    r.add_argument("--bundled-dir", default=None, help="bundled models folder (default: the project's Resources/Models)")
    from .robustness_cli import add_parsers

    add_parsers(sub)  # robustness, choose-postprocessing, choose-padding
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("fit", "cache"):
            from .config import load_config
            from .trainer import Trainer

            overrides = _parse_override(args.set)
            if getattr(args, "run_dir", None):
                overrides["output_dir"] = args.run_dir
            cfg = load_config(args.config, overrides)
            if args.command == "cache":
                t = Trainer(cfg)
                t.prepare_data()
                print(t.cache_folder)
                return 0
            if args.resume and args.overwrite:
                raise SystemExit("--resume continues a run and --overwrite replaces it: choose one")
            result = Trainer(cfg, resume=args.resume, overwrite=args.overwrite).fit(
                time_limit_s=args.time_limit, until_iteration=args.until)
            print(json.dumps({"iteration": result["iteration"], "output_dir": cfg.output_dir}))
            return 0
        if args.command == "export":
            from .export import export_run

            metrics = json.loads(Path(args.metrics).read_text(encoding="utf-8")) if args.metrics else None
            perf = json.loads(Path(args.performance).read_text(encoding="utf-8")) if args.performance else None
            export_run(args.run_dir, args.destination, metrics, perf, overwrite=args.overwrite,
                       weights_dtype=args.weights_dtype, version=args.version, description=args.description,
                       weights=args.weights, model_id=args.model_id, replace_bundled=args.replace_bundled)
            return 0
        if args.command == "evaluate":
            from .evaluate import evaluate_model

            evaluate_model(args.model, args.dataset, args.out, split=args.split, sm=args.sm, device=args.device,
                           limit=args.limit, postprocess=args.postprocess, landmark=args.landmark,
                           padding_mode=args.padding_mode)
            return 0
        if args.command == "diagnose":
            from .diagnose import format_report, saturation_report

            report = saturation_report(args.run_dir, weights=args.weights, patches=args.patches,
                                       device=args.device)
            print(json.dumps(report, indent=1) if args.json else format_report(report))
            return 0
        if args.command == "card-metrics":
            from .card_metrics import write_card_metrics

            entries = {}
            for item in args.entries:
                key, sep, folder = item.partition("=")
                if not sep or not key or not folder:
                    raise SystemExit(f"expected KEY=EVAL_DIR, got '{item}'")
                entries[key] = Path(folder)
            if not args.out and not args.write_card:
                raise SystemExit("card-metrics: give --out FILE, --write-card PACKAGE, or both")
            if args.out:
                print(write_card_metrics(entries, Path(args.out), args.note))
            if args.write_card:
                from .card_edit import set_card_fields
                from .card_metrics import card_metrics

                print(set_card_fields(args.write_card, {"metrics": card_metrics(entries, args.note)}))
            return 0
        if args.command == "release":
            from .release import install_release, plan_release, run_release

            perts = [p.strip() for p in args.perturbations.split(",")] if args.perturbations else None
            plan = plan_release(args.run_dir, args.version, args.cross_domain, cross_split=args.cross_split,
                                in_domain_split=args.in_domain_split, choose_split=args.choose_split,
                                staging=args.staging, bundled_dir=args.bundled_dir,
                                robustness_cases=args.robustness_cases, perturbations=perts, device=args.device,
                                allow_unfinished=args.allow_unfinished)
            run_release(plan)
            print((plan.staging / "release.md").read_text(encoding="utf-8"))
            if args.install:
                install_release(plan)
            return 0
        if args.command in ("robustness", "choose-postprocessing", "choose-padding"):
            from .robustness_cli import run

            return run(args)
    except CancelledError as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 130
    except SRCSMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
