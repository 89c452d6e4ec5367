"""Command-line parts of ``python -m train robustness``, ``choose-postprocessing`` and ``choose-padding``.

Kept apart from :mod:`train.robustness` so that building the parser imports nothing heavy (torch,
SimpleITK), like the other subcommands of ``train/__main__.py``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def _model_and_own_data(parser: argparse.ArgumentParser) -> None:
    """The arguments of a command that chooses a card setting on the model's own validation cases."""
    parser.add_argument("model", help="model package folder (or catalogue id without --write-card)")
    parser.add_argument("dataset", help="the model's own (source-domain) dataset")
    parser.add_argument("--device", default="cpu")


def add_parsers(sub) -> None:
    """Add the three subcommands to ``python -m train``'s subparsers."""
    r = sub.add_parser(
        "robustness", help="a model on real cases, unperturbed and under the perturbations real scans bring "
                           "(partial field of view, resampling, flips, oblique grids, raw HU, scaled intensities)",
        description="Run: robustness MODEL DATASET --out DIR. Report: robustness --report DIR [DIR ...] "
                    "--markdown docs/robustness.md --figures docs/figures. Card: robustness --write-card PACKAGE "
                    "--field-of-view DIR [DIR ...].")
    r.add_argument("model", nargs="?", help="model package path or catalogue id")
    r.add_argument("dataset", nargs="?", help="nnU-Net raw dataset folder with labels")
    r.add_argument("--split", default="test", help="split of splits.json (default test; 'all' for every case)")
    r.add_argument("--cases", type=int, default=3, help="the first N cases of the split (default 3)")
    r.add_argument("--case", action="append", default=[], metavar="ID", help="these cases instead (repeatable)")
    r.add_argument("--perturbations", default=None,
                   help="comma-separated subset (default: all that apply to the dataset's modality)")
    r.add_argument("--postprocess", default="card", help="clean-up: card (default), none, keep-largest, min-volume:MM3")
    r.add_argument("--no-source-matching", action="store_true")
    r.add_argument("--target-modality", choices=["auto", "CT", "MR"], default="auto")
    r.add_argument("--device", default="cpu", help="cpu (default), auto, cuda")
    r.add_argument("--padding-mode", choices=["card", "constant", "replicate"], default="card",
                   help="how the network input is padded where the model grid is smaller than the window: card (the default: the model card's inference.padding_mode, what every front end does), constant or replicate (experiments: docs/benchmarks.md \"Padding a thin scan\"; a padding other than the card's never goes into a card)")
    r.add_argument("--seed", type=int, default=0, help="seed of the random perturbations (raw HU noise)")
    r.add_argument("--out", help="output folder of the run")
    r.add_argument("--report", nargs="+", metavar="DIR", help="write the report from these result folders")
    r.add_argument("--previous", nargs="+", default=[], metavar="DIR",
                   help="with --report: result folders of earlier model versions, set beside the runs on the same cases")
    r.add_argument("--markdown", default="docs/robustness.md", help="report file (with --report)")
    r.add_argument("--figures", default="docs/figures", help="figure folder (with --report)")
    r.add_argument("--write-card", metavar="PACKAGE",
                   help="write the slabs of the result folders given by --field-of-view into PACKAGE/model.json "
                        "(its field_of_view: how thin a view the model segments reliably; the thin-view warning's data)")
    r.add_argument("--field-of-view", nargs="+", metavar="DIR",
                   help="with --write-card: the package's robustness result folders, one per dataset")

    c = sub.add_parser("choose-postprocessing",
                       help="measure the inference strategies (whole grid, sliding window) and clean-ups on a "
                            "model's validation cases, pick the best pair, optionally write it into the card")
    _model_and_own_data(c)
    c.add_argument("--split", default="val", help="comma-separated splits, e.g. val or val,test (default val)")
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--out", default=None, help="JSON file for the measurements")
    c.add_argument("--strategies", default="whole_grid,sliding_window",
                   help="comma-separated inference strategies to compare (default: both)")
    c.add_argument("--write-card", action="store_true",
                   help="write the choice (inference.strategy and postprocessing) into MODEL/model.json")

    p = sub.add_parser("choose-padding",
                       help="measure constant and replicate padding of thin grids on slabs of a model's validation "
                            "cases, pick one, optionally write it into the card (inference.padding_mode)")
    _model_and_own_data(p)
    p.add_argument("--split", default="val", help="split of the dataset (default val)")
    p.add_argument("--cases", type=int, default=None, help="the first N cases of the split (default: all)")
    p.add_argument("--out", required=True, help="folder for the two robustness runs and choose-padding.json")
    p.add_argument("--write-card", action="store_true",
                   help="write the choice into MODEL/model.json (then measure the card's metrics and field of view "
                        "again: they were measured with the old padding)")


def run(args: argparse.Namespace) -> int:
    """Dispatch one of the subcommands."""
    if args.command == "choose-padding":
        from pathlib import Path

        from .choose_padding import choose, measure, write_card

        measured = measure(args.model, args.dataset, args.out, split=args.split, cases=args.cases, device=args.device)
        chosen = choose(measured)
        measured["chosen"] = {"padding_mode": chosen.padding_mode, "chosen_by": chosen.chosen_by}
        Path(args.out, "choose-padding.json").write_text(json.dumps(measured, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(measured["chosen"], indent=1, ensure_ascii=False))
        if args.write_card:
            from SRCSMSegmenterLib.modelpackage import load_package

            before = load_package(args.model).card
            print(f"wrote {write_card(args.model, chosen)}")
            if before.inference.padding_mode != chosen.padding_mode and (before.metrics or before.field_of_view):
                print(f"warning: the card's padding changed ({before.inference.padding_mode} → {chosen.padding_mode}); "
                      f"its metrics and field of view were measured with the old one: measure them again "
                      f"(python -m train evaluate / card-metrics --write-card, robustness --write-card)", file=sys.stderr)
        return 0
    if args.command == "choose-postprocessing":
        from pathlib import Path

        from .choose_postprocessing import choose, measure, write_card

        strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
        summary = measure(args.model, args.dataset, args.split.split(","), device=args.device, limit=args.limit,
                          strategies=strategies)
        chosen = choose(summary)
        summary["chosen"] = {"strategy": chosen.strategy, "strategy_chosen_by": chosen.strategy_chosen_by,
                             "postprocessing": chosen.postprocessing.model_dump(mode="json")}
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(summary["chosen"], indent=1))
        if args.write_card:
            print(f"wrote {write_card(args.model, chosen.postprocessing, chosen.strategy, chosen.strategy_chosen_by)}")
        return 0
    from .robustness import run_robustness, write_field_of_view, write_report

    if args.write_card or args.field_of_view:
        if not (args.write_card and args.field_of_view):
            raise SystemExit("robustness: --write-card PACKAGE needs --field-of-view DIR [DIR ...] (and the other way round)")
        print(f"wrote {write_field_of_view(args.write_card, args.field_of_view)}")
        return 0
    if args.report:
        write_report(args.report, args.markdown, args.figures, previous=args.previous)
        return 0
    if not (args.model and args.dataset and args.out):
        raise SystemExit("robustness needs MODEL DATASET --out DIR (or --report DIR ...)")
    perts = [p.strip() for p in args.perturbations.split(",")] if args.perturbations else None
    command = "python -m train robustness " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    run_robustness(args.model, args.dataset, args.out, split=args.split, cases=args.cases, case_ids=args.case or None,
                   perturbations=perts, device=args.device, postprocess=args.postprocess,
                   source_matching=not args.no_source_matching, target_modality=args.target_modality,
                   seed=args.seed, command=command, padding_mode=args.padding_mode)
    return 0
