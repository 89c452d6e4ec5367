"""Release a trained run as a new version of a model: every measurement a card and the docs need, in one
reproducible, resumable command.

``python -m train release RUN_DIR --version 0.3.0 --cross-domain DATASET [--install]``

Until now a release was a hand-kept shell script in the git-ignored ``runs/`` (and a checkout that lost
``runs/`` lost it). This command runs the same steps, in this order, into a staging folder
(``runs/release/<id>-<version>`` unless ``--staging``), and never touches the bundled package unless
``--install`` is given:

1. **export** the run's EMA weights (float16) as ``<id>`` ``<version>`` (the run must have finished:
   its checkpoint at the recipe's last iteration);
2. **choose** the inference strategy and clean-up on the model's own validation cases
   (:mod:`train.choose_postprocessing`), then the **padding** of thin grids on slabs of the same cases
   (:mod:`train.choose_padding`), and write them into the card;
3. **evaluate** in-domain (the own dataset's test split, or its validation split where there is no
   test split; source matching off, as in-domain protocols are measured) and cross-domain (with and
   without source matching), through the card's clean-up;
4. **robustness** (:mod:`train.robustness`) on the first cases of both;
5. **previous**: the currently bundled version of the same id through the same two evaluations, so
   the release report compares like with like (once this release is installed, a rerun keeps those
   evaluations and never measures the release against itself);
6. **card metrics** from the evaluations (keys reused from the previous card where the protocol is the
   same, so the history of a key stays one protocol), and the card's **field of view** from the
   robustness slabs (:func:`train.robustness.field_of_view_limits`: the thin-view warning's data);
7. ``release.md`` / ``release.json`` in the staging folder: the new numbers next to the previous
   version's, and what keeps the model from the robustness bar.

Each step records a fingerprint of its inputs in ``steps.json``: the card it measured (the weights'
sha256 plus the inference and clean-up settings) and its own settings (dataset, split, cases,
perturbations, device). A rerun skips every step whose record matches, so a release interrupted after an
hour resumes where it stopped, and a changed choice or setting re-measures exactly what depends on it.

``--install`` then replaces ``Resources/Models/<id>`` with the staged package (atomically: the old folder
is swapped out only once the new one is complete and verified). The card's ``performance`` is left
for ``Testing/benchmarks/bench_inference.py --package`` (a benchmark, not part of a release run: its
timings would share the cores with the release's own steps) and its ``description`` to a person, who
says what the version measured; the report lists what is still missing and ``--install`` refuses a card
that lacks either (:func:`left_by_hand`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from SRCSMSegmenterLib.errors import InputError
from SRCSMSegmenterLib.image import atomic_output
from SRCSMSegmenterLib.modelpackage import MODEL_JSON, WEIGHTS_FILE, load_package, swap_folder_in

from .card_edit import MEASURED_CARD_FIELDS, set_card_fields
from .card_metrics import card_metrics
from .config import TrainConfig
from .datasets import Dataset, load_dataset

STEPS_FILE = "steps.json"


@dataclass(frozen=True)
class Protocol:
    """One evaluation: a dataset split, in-domain or cross-domain, and the source-matching settings."""

    kind: str  # "in_domain" or "cross_domain"
    dataset: Dataset
    split: str
    sm: str  # "off" for in-domain, "both" cross-domain

    @property
    def cases(self) -> int:
        return len(self.dataset.split(self.split))


@dataclass
class ReleasePlan:
    run_dir: Path
    model_id: str
    version: str
    own: Dataset
    choose_split: str
    in_domain: Protocol
    cross_domain: Protocol
    staging: Path
    bundled_dir: Path  # where the bundled packages live (``--install`` writes here)
    previous: Path | None  # the bundled package of the same id, if any, unless it is this release installed
    previous_version: str | None = None  # its version (from the staging's report once this one is installed)
    robustness_cases: int = 3
    perturbations: list[str] | None = None
    device: str = "cpu"
    records: dict[str, str] = field(default_factory=dict)

    @property
    def package(self) -> Path:
        return self.staging / self.model_id


def card_fingerprint(package_dir: Path) -> str:
    """sha256 over the card fields that decide what a measurement of this package measured."""
    card = _read_json(Path(package_dir) / MODEL_JSON)
    blob = json.dumps({k: card.get(k) for k in MEASURED_CARD_FIELDS}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _finished_iteration(run_dir: Path) -> tuple[TrainConfig, int]:
    state_file = run_dir / "checkpoint.json"
    if not state_file.is_file():
        raise InputError(f"'{run_dir}' has no checkpoint.json: give the output folder of a `python -m train fit` run.")
    state = _read_json(state_file)
    return TrainConfig.model_validate(state["config"]), int(state["iteration"])


def _bundled_package(model_id: str, bundled_dir: Path) -> Path | None:
    folder = bundled_dir / model_id
    return folder if (folder / MODEL_JSON).is_file() else None


def _previous_version(model_id: str, version: str, bundled_dir: Path,
                      staging: Path) -> tuple[Path | None, str | None]:
    """The version to measure beside this one: the bundled package of the same id — unless that *is* this
    release, installed by an earlier call (same version or same weights). Then the earlier version's
    evaluations in the staging folder are what the report keeps, and nothing is measured against the
    release itself (which would overwrite them with the new model's numbers)."""
    bundled = _bundled_package(model_id, bundled_dir)
    if bundled is None:
        return None, None
    card = _read_json(bundled / MODEL_JSON)
    staged = staging / model_id / MODEL_JSON
    staged_sha = _read_json(staged)["weights"]["sha256"] if staged.is_file() else None
    if card.get("version") != version and card["weights"]["sha256"] != staged_sha:
        return bundled, card.get("version")
    report = staging / "release.json"
    return None, _read_json(report).get("previous_version") if report.is_file() else None


def plan_release(run_dir: str | os.PathLike[str], version: str, cross_domain: str | os.PathLike[str],
                 cross_split: str = "all", in_domain_split: str | None = None, choose_split: str | None = None,
                 staging: str | os.PathLike[str] | None = None, bundled_dir: str | os.PathLike[str] | None = None,
                 robustness_cases: int = 3, perturbations: list[str] | None = None, device: str = "cpu",
                 allow_unfinished: bool = False) -> ReleasePlan:
    """Check the inputs and decide every protocol before anything runs (errors in seconds, not hours)."""
    from SRCSMSegmenterLib.catalog import default_bundled_dirs

    run_dir = Path(run_dir)
    config, iteration = _finished_iteration(run_dir)
    if iteration < config.iterations and not allow_unfinished:
        raise InputError(f"the run in '{run_dir}' has its last checkpoint at iteration {iteration} of {config.iterations}: "
                         f"let it finish (or resume it: `python -m train fit RECIPE --resume`) before releasing, "
                         f"or pass --allow-unfinished.")
    own = load_dataset(config.dataset)
    other = load_dataset(cross_domain)
    if other.root.resolve() == own.root.resolve():
        raise InputError(f"--cross-domain '{cross_domain}' is the dataset the model was trained on; give the other "
                         "domain's dataset (e.g. MR for a CT model).")
    choose = choose_split or config.val_split
    if in_domain_split is None:
        in_domain_split = "test" if own.splits.get("test") else choose
    for dataset, split in ((own, choose), (own, in_domain_split), (other, cross_split)):
        if not dataset.split(split):  # also raises, naming the splits, if the split does not exist
            raise InputError(f"split '{split}' of '{dataset.name}' has no cases.")
    if perturbations:
        from .perturbations import perturbations_for

        try:
            perturbations_for(own.modality, list(perturbations))
        except ValueError as exc:
            raise InputError(f"--perturbations: {exc}") from exc
    model_id = config.model.id
    if bundled_dir is None:
        dirs = default_bundled_dirs()
        bundled_dir = dirs[0] if dirs else Path("Resources/Models")
    staging = Path(staging) if staging else Path("runs/release") / f"{model_id}-{version}"
    previous, previous_version = _previous_version(model_id, version, Path(bundled_dir), staging)
    return ReleasePlan(run_dir=run_dir, model_id=model_id, version=version, own=own, choose_split=choose,
                       in_domain=Protocol("in_domain", own, in_domain_split, "off"),
                       cross_domain=Protocol("cross_domain", other, cross_split, "both"),
                       staging=staging, bundled_dir=Path(bundled_dir),
                       previous=previous, previous_version=previous_version,
                       robustness_cases=robustness_cases, perturbations=perturbations, device=device)


# ------------------------------------------------------------------------------- steps and records

def _load_records(plan: ReleasePlan) -> None:
    f = plan.staging / STEPS_FILE
    plan.records = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def _save_records(plan: ReleasePlan) -> None:
    with atomic_output(plan.staging / STEPS_FILE) as tmp:
        Path(tmp).write_text(json.dumps(plan.records, indent=1) + "\n", encoding="utf-8")


def _step(plan: ReleasePlan, name: str, inputs: dict[str, Any], output: Path, work: Callable[[], Any], log) -> bool:
    """Run ``work`` unless ``steps.json`` says it ran on exactly these ``inputs`` (the card's fingerprint
    and the step's own settings: dataset, split, cases, perturbations …) and its output is there."""
    fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    if plan.records.get(name) == fingerprint and output.exists():
        log(f"[release] {name}: kept (already measured on this card)")
        return False
    log(f"[release] {name} …")
    work()
    plan.records[name] = fingerprint
    _save_records(plan)
    return True


def metric_key(protocol: Protocol, previous_metrics: dict[str, Any]) -> str:
    """The card key of a protocol: the previous card's key for the same dataset, split and case count,
    else ``<kind>_<dataset>_<split><cases>``."""
    for key, entry in previous_metrics.items():
        if (isinstance(entry, dict) and key.startswith(protocol.kind) and entry.get("dataset") == protocol.dataset.name
                and entry.get("split") == protocol.split and entry.get("cases") == protocol.cases):
            return key
    slug = "".join(c if c.isalnum() else "_" for c in protocol.dataset.name.lower())
    return f"{protocol.kind}_{slug}_{protocol.split}{protocol.cases}"


def run_release(plan: ReleasePlan, log=print) -> dict:
    """Run (or resume) every step of the release into ``plan.staging``; return the release summary."""
    from .choose_postprocessing import choose, measure, write_card
    from .evaluate import evaluate_model
    from .export import export_run
    from SRCSMSegmenterLib.modelpackage import load_package

    from .robustness import field_of_view_limits, load_results, run_robustness

    plan.staging.mkdir(parents=True, exist_ok=True)
    _load_records(plan)
    config, iteration = _finished_iteration(plan.run_dir)
    run_key = {"run": str(plan.run_dir.resolve()), "iteration": iteration, "id": plan.model_id, "version": plan.version}

    def do_export() -> None:
        export_run(plan.run_dir, plan.package, overwrite=True, weights_dtype="float16", version=plan.version,
                   model_id=plan.model_id, replace_bundled=True, log=log)

    # the export is keyed on the run and its iteration: a resumed run that trained further is re-exported
    if _step(plan, "export", run_key, plan.package / MODEL_JSON, do_export, log):
        plan.records = {"export": plan.records["export"]}  # everything measured on an older export is void
        _save_records(plan)
    choose_file = plan.staging / "choose.json"

    def do_choose() -> None:
        summary = measure(plan.package, plan.own.root, [plan.choose_split], device=plan.device, log=log)
        chosen = choose(summary)
        summary["chosen"] = {"strategy": chosen.strategy, "postprocessing": chosen.postprocessing.model_dump(mode="json")}
        with atomic_output(choose_file) as tmp:
            Path(tmp).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        write_card(plan.package, chosen.postprocessing, chosen.strategy, chosen.strategy_chosen_by)

    _step(plan, "choose", {**run_key, "split": plan.choose_split, "dataset": str(plan.own.root)}, choose_file,
          do_choose, log)
    padding_file = plan.staging / "padding" / "choose-padding.json"

    def do_padding() -> None:
        from . import choose_padding

        measured = choose_padding.measure(plan.package, plan.own.root, padding_file.parent, split=plan.choose_split,
                                          device=plan.device, log=log)
        chosen = choose_padding.choose(measured)
        measured["chosen"] = {"padding_mode": chosen.padding_mode, "chosen_by": chosen.chosen_by}
        with atomic_output(padding_file) as tmp:
            Path(tmp).write_text(json.dumps(measured, indent=1) + "\n", encoding="utf-8")
        choose_padding.write_card(plan.package, chosen)

    # measured with the strategy and clean-up just chosen: keyed, like that choice, on the run, and on
    # that choice (a new one re-measures the padding)
    chosen_before = hashlib.sha256(choose_file.read_bytes()).hexdigest()
    _step(plan, "choose padding", {**run_key, "split": plan.choose_split, "dataset": str(plan.own.root),
                                   "after": chosen_before}, padding_file, do_padding, log)
    fp = card_fingerprint(plan.package)
    evals = plan.staging / "eval"

    def settings(proto: Protocol, **more: Any) -> dict[str, Any]:
        return {"dataset": str(proto.dataset.root.resolve()), "split": proto.split, "sm": proto.sm,
                "device": plan.device, **more}

    for proto in (plan.in_domain, plan.cross_domain):
        out = evals / proto.kind
        _step(plan, f"evaluate {proto.kind}", settings(proto, card=fp), out / "summary.json",
              lambda p=proto, o=out: evaluate_model(plan.package, p.dataset.root, o, split=p.split, sm=p.sm,
                                                    device=plan.device, log=log), log)
    for proto in (plan.in_domain, plan.cross_domain):
        out = plan.staging / "robustness" / proto.kind
        _step(plan, f"robustness {proto.kind}", settings(proto, card=fp, cases=plan.robustness_cases,
                                                         perturbations=plan.perturbations), out / "robustness.json",
              lambda p=proto, o=out: run_robustness(plan.package, p.dataset.root, o, split=p.split,
                                                    cases=plan.robustness_cases, perturbations=plan.perturbations,
                                                    device=plan.device, log=log,
                                                    command=f"python -m train release {plan.run_dir} (staged)"), log)
    # the card keys continue the previous card's; once installed, the staged card carries those same keys
    keys_from = plan.previous if plan.previous is not None else plan.package
    previous_metrics: dict[str, Any] = _read_json(keys_from / MODEL_JSON).get("metrics") or {}
    if plan.previous is not None:
        prev_fp = card_fingerprint(plan.previous)
        for proto in (plan.in_domain, plan.cross_domain):
            out = evals / f"previous_{proto.kind}"
            _step(plan, f"previous {proto.kind}", settings(proto, card=prev_fp), out / "summary.json",
                  lambda p=proto, o=out: evaluate_model(plan.previous, p.dataset.root, o, split=p.split,
                                                        sm=p.sm, device=plan.device, log=log), log)
    elif plan.previous_version is not None:
        log(f"[release] previous: {plan.model_id} {plan.version} is the bundled package now (installed); "
            f"{plan.previous_version}'s evaluations are kept as measured before")
    keys = {metric_key(p, previous_metrics): evals / p.kind for p in (plan.in_domain, plan.cross_domain)}
    note = (f"{iteration} iterations ({config.augmentation}, recipe of {plan.run_dir.name}); measured with "
            f"python -m train release on {_measured_on([p / 'summary.json' for p in keys.values()])} on this "
            f"package (float16 weights), "
            f"the card's inference strategy and clean-up; in-domain without source matching, cross-domain with "
            f"and without. Strategy and clean-up were chosen on the {plan.choose_split} cases of {plan.own.name}.")
    robustness_runs = [plan.staging / "robustness" / p.kind for p in (plan.in_domain, plan.cross_domain)]
    limits = field_of_view_limits(load_results(robustness_runs), load_package(plan.package).card.weights.sha256)
    fields: dict[str, Any] = {"metrics": card_metrics(keys, note)}
    if limits is not None:
        fields["field_of_view"] = limits.model_dump(mode="json")
    else:
        log("[release] no slab perturbation ran: the card's field_of_view (the thin-view warning's data) is not "
            "measured by this release and stays as it was")
    set_card_fields(plan.package, fields)
    summary = release_summary(plan, keys)
    write_release_report(plan, summary)
    log(f"[release] staged {plan.model_id} {plan.version} in {plan.package}; report {plan.staging / 'release.md'}")
    return summary


# ------------------------------------------------------------------------------------ the report

def _measured_on(summaries: list[Path]) -> str:
    """The day the evaluations behind the card's metrics finished (UTC; the latest of their summaries'
    modification times), not the day of this call: a release rerun to install keeps its measured steps,
    and the card must not date them anew."""
    latest = max(path.stat().st_mtime for path in summaries)
    return _dt.datetime.fromtimestamp(latest, _dt.timezone.utc).date().isoformat()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _mean(summary: dict, setting: str) -> float | None:
    s = summary["settings"].get(setting)
    return None if s is None else s["mean"]["dice"]


def release_summary(plan: ReleasePlan, keys: dict[str, Path]) -> dict:
    """New and previous mean Dice per protocol and setting, and the robustness bar per domain."""
    from .evaluate import SETTINGS
    from .robustness import UNPERTURBED, bar_failures, summarize

    evals = plan.staging / "eval"
    out: dict[str, Any] = {"model": plan.model_id, "version": plan.version, "package": str(plan.package),
                           "previous_version": None, "protocols": {}, "robustness": {}}
    out["previous_version"] = plan.previous_version
    for key, folder in keys.items():
        kind = folder.name
        new = _read_json(folder / "summary.json")
        entry = {"key": key, "dataset": new["dataset"], "split": new["split"], "cases": new["cases"],
                 "postprocessing": new.get("postprocessing"), "inference": new.get("inference"), "settings": {}}
        prev_file = evals / f"previous_{kind}" / "summary.json"
        prev = _read_json(prev_file) if prev_file.is_file() and plan.previous_version is not None else None
        for name, label in SETTINGS.items():
            dice = _mean(new, label)
            if dice is None:
                continue
            entry["settings"][name] = {"dice": dice, "previous": None if prev is None else _mean(prev, label)}
        out["protocols"][kind] = entry
    for kind in ("in_domain", "cross_domain"):
        f = plan.staging / "robustness" / kind / "robustness.json"
        if f.is_file():
            s = summarize(_read_json(f))
            out["robustness"][kind] = {"unperturbed": s[UNPERTURBED]["dice"] if UNPERTURBED in s else None,
                                       "bar_failures": bar_failures(s)}
    out["left_by_hand"] = left_by_hand(plan.package, _exported_description(plan))
    return out


def _exported_description(plan: ReleasePlan) -> str:
    from .export import default_description

    return default_description(_finished_iteration(plan.run_dir)[0], plan.own)


def left_by_hand(package: Path, exported_description: str | None) -> list[str]:
    """What the staged card still lacks before it can be installed: the measured ``performance`` (not
    timed here: the release's own steps would share the cores with it) and a ``description`` that says
    what the release measured (the export writes the recipe's or the dataset's)."""
    card = _read_json(package / MODEL_JSON)
    todo = []
    if not card.get("performance"):
        todo.append("`performance` (`python Testing/benchmarks/bench_inference.py --package "
                    f"{package}`, set with `train.card_edit.set_card_fields`)")
    if not card.get("description") or card.get("description") == exported_description:
        todo.append("`description` (still the one the export wrote; say what this version measured)")
    return todo


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def write_release_report(plan: ReleasePlan, summary: dict) -> Path:
    prev = summary["previous_version"]
    lines = [f"# Release {summary['model']} {summary['version']}", "",
             f"Staged package `{plan.package}` from `{plan.run_dir}`; made by `python -m train release` on "
             f"{_dt.date.today().isoformat()}, device {plan.device}. Mean Dice over the labels; the previous "
             f"version ({prev or 'none bundled'}) through the same protocol and its own card's strategy and clean-up.",
             "", "| protocol | dataset (split, cases) | source matching | Dice | previous | change |",
             "|---|---|---|---|---|---|"]
    for kind, p in summary["protocols"].items():
        for setting, v in p["settings"].items():
            change = "—" if v["previous"] is None else f"{v['dice'] - v['previous']:+.3f}"
            lines.append(f"| {kind.replace('_', '-')} (`{p['key']}`) | {p['dataset']} ({p['split']}, {p['cases']}) | "
                         f"{setting} | {_f(v['dice'])} | {_f(v['previous'])} | {change} |")
    lines += ["", "Robustness (`python -m train robustness`, the bar of issue 15):", ""]
    for kind, r in summary["robustness"].items():
        verdict = "met" if not r["bar_failures"] else "not met: " + "; ".join(r["bar_failures"])
        lines.append(f"- {kind.replace('_', '-')}: unperturbed {_f(r['unperturbed'])}; the bar {verdict}")
    todo = summary.get("left_by_hand", [])
    lines += ["", ("Left by hand before installing: the card's " + " and ".join(todo) + "; then "
                   if todo else "The card's performance and description are filled in; ")
              + "`python -m train release … --install`.", ""]
    path = plan.staging / "release.md"
    with atomic_output(path) as tmp:
        Path(tmp).write_text("\n".join(lines), encoding="utf-8")
    with atomic_output(plan.staging / "release.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------- installing

def install_release(plan: ReleasePlan, log=print) -> Path:
    """Replace ``<bundled_dir>/<id>`` with the staged package: verified first, swapped in atomically."""
    staged = load_package(plan.package)  # verifies the weights' sha256 against the card
    if staged.card.version != plan.version or staged.id != plan.model_id:
        raise InputError(f"the staged package in '{plan.package}' is {staged.id} {staged.card.version}, not "
                         f"{plan.model_id} {plan.version}: rerun the release.")
    if not staged.card.metrics:
        raise InputError(f"the staged package in '{plan.package}' has no measured metrics: run the release first.")
    todo = left_by_hand(plan.package, _exported_description(plan))
    if todo:
        raise InputError(f"the staged card in '{plan.package}' still lacks " + " and ".join(todo)
                         + "; fill them in, then install.")
    bundled_dir = plan.bundled_dir
    target = bundled_dir / plan.model_id
    tmp = Path(tempfile.mkdtemp(prefix=f".{plan.model_id}.", dir=bundled_dir))
    try:
        for name in (MODEL_JSON, WEIGHTS_FILE):
            shutil.copy2(plan.package / name, tmp / name)
        load_package(tmp)  # the copy is complete and intact before anything is replaced
        swap_folder_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"[release] installed {plan.model_id} {plan.version} into {target}")
    return target
