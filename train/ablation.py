"""The cross-domain ablation of issue "Real models and the evidence", as a resumable plan.

``python -m train.ablation plan``     lists every run (protocol × method, plus in-domain references) with its
                                      budget and how far it got;
``python -m train.ablation run [--only NAME] [--time-limit S]``
                                      trains (resuming), exports and evaluates what is not done yet;
``python -m train.ablation adopt NAME RUN_DIR``
                                      takes an already trained run (e.g. a model-zoo run) as the cell NAME
                                      after checking that it *is* that cell: same recipe settings, same data,
                                      same method, checkpoint exactly at the cell's budget;
``python -m train.ablation adopt-package NAME PACKAGE``
                                      the same for an exported model package (its card carries the training
                                      configuration and iteration), then evaluates it as the cell;
``python -m train.ablation abandon NAME --reason TEXT``
                                      records that a cell is not measured and why (e.g. its training
                                      diverged), with where its training stood, so the table states the
                                      reason; removing the record puts the cell back in the plan;
``python -m train.ablation notes``    rewrites the notes of recorded cells from their run logs (when the
                                      checkout still has them), without retraining or re-evaluating;
``python -m train.ablation table``    collects every recorded result into ``docs/ablation.md`` (mean
                                      Dice and ASSD with and without SM, per-organ Dice of the best
                                      cross-domain setting, published references) and ``docs/ablation.png``.

A finished cell is *recorded* in ``docs/ablation-results/NAME.json`` (the evaluation summary with where it
came from), which is committed: run folders, checkpoints and per-case evaluations are git-ignored — they
stay in the checkout they were made in (a later session on it resumes a run from its last checkpoint) but
not in a fresh clone or on another machine; the record travels with the repository, so the table never
loses a measured cell. Every step is idempotent: a recorded cell is done, a run whose checkpoint reached
its budget is not retrained, an exported package is not re-exported, an evaluation with a
``summary.json`` is not redone. So the plan can be advanced a few hours per session, on CPU or GPU, and a
run longer than a session (GIN-IPA: three views per step) continues where it stopped.
Methods are only compared at equal budget: the budget belongs to the protocol, and every cell of a
protocol is trained to exactly that many iterations. The in-domain reference of a protocol trains on
the target domain with the recipe of the reverse protocol, so it gets that protocol's budget (it is a
reference, not a contestant) — and is the very model of the reverse protocol's SRC cell: one training
serves both (:func:`twin`).
Every cell trains with the recipe's seed, except those in :data:`RESEEDED`: a first attempt whose
training collapsed (the generalised Dice loss saturated, one class predicted everywhere) or diverged is
rerun once with another seed, everything else equal, and the record names the seed and what the first attempt did.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from SRCSMSegmenterLib.errors import CancelledError, SRCSMError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "docs" / "ablation-results"
METHODS = ("none", "rcnet_global", "randconv", "gin_ipa", "src")

# Published single-source results (mean Dice, %) on the same protocols, to aim past: SLAug (Su et al.,
# AAAI 2023, 2D network) as reported in its paper.
PUBLISHED = {"ct2mr": ("SLAug (AAAI 2023, 2D)", 88.6), "mr2ct": ("SLAug (AAAI 2023, 2D)", 83.1),
             "bssfp2lge": ("SLAug (AAAI 2023, 2D)", 86.7)}

# Settings that must agree between an adopted run and the plan's own configuration: everything that
# changes what is learned. Paths, names, logging cadence, thread count and device do not.
_TRAINING_KEYS = ("train_split", "val_split", "spacing", "patch_size", "network", "normalization",
                  "pre_smoothing_mm", "augmentation", "spatial_augmentation", "intensity_augmentation",
                  "crop_margin", "landmark_sampling", "foreground_oversampling", "fov_augmentation",
                  "fov_min_slab_mm", "fov_min_inplane", "fov_length_sampling", "fov_padding", "loss",
                  "batch_size", "learning_rate", "lr_schedule",
                  "warmup_iterations", "l2", "ema_decay", "clip_factor", "consistency_weight",
                  "precision", "seed")


#: Cells trained with another seed than their recipe's, and why. Only for a first attempt that collapsed
#: or diverged (possibly a property of that one random trajectory, not of the method: other cells of the
#: same protocol and settings trained normally; the rerun tells); the seed-0 run logs are kept in the
#: checkout's ``runs/broken/``.
RESEEDED: dict[str, tuple[int, str]] = {
    "ct2mr-gin_ipa": (1, "seed 0 collapsed at iteration ≈ 740 of 4 000: the loss jumped from 0.70–0.86 to "
                         "0.9996 with a gradient norm of 0.001–0.005 (one class everywhere) and stayed there "
                         "to iteration 920, where it was stopped"),
    "ct2mr-randconv": (1, "seed 0 collapsed at iteration ≈ 3 090 of 4 000: validation mean Dice 0.638 at "
                          "3 000, 0.023 at 4 000, the loss ≈ 1 with a gradient norm of 10⁻⁴ from the collapse "
                          "on; that model scored 0.027 mean Dice on the MR test cases (with and without SM)"),
    "bssfp2lge-randconv": (1, "seed 0 never learned and diverged: the loss stayed at 0.97–0.99 (one class "
                              "everywhere) through iteration 200, then from ≈ 450 the gradient norm grew about "
                              "tenfold every 50 iterations (1.3·10¹³ at 1 010, loss 0.84) and the run was stopped "
                              "at 1 015 (validation mean Dice 0.004 at 1 000)"),
}


@dataclass(frozen=True)
class Protocol:
    name: str
    source: str
    target: str
    target_split: str  # evaluation split of the target ("all" = every case)
    recipe: str
    iterations: int  # the budget every method of this protocol is trained to
    in_domain_split: str = "test"
    in_domain_train_split: str | None = "train"  # None: the target has no training split
    #: settings the protocol fixes whatever its recipe says, so that a recipe improved for users later
    #: does not change what the protocol's recorded cells were trained with (``(key, value)`` pairs)
    fixed: tuple[tuple[str, object], ...] = ()
    #: the methods compared (a later, longer budget compares fewer: every cell is hours of training)
    methods: tuple[str, ...] = METHODS
    #: training recipe generation: a protocol's reverse (in-domain references) is of the same generation
    generation: str = "v1"
    #: the cross-domain task (source → target) whatever the generation: the published reference's key
    task: str = ""

    @property
    def reverse(self) -> "Protocol | None":
        return next((p for p in PROTOCOLS if p.source == self.target and p.target == self.source
                     and p.generation == self.generation), None)

    @property
    def published(self) -> tuple[str, float] | None:
        return PUBLISHED.get(self.task or self.name)


# Budgets: what a CPU session can afford for the lighter 16–256 U-Net (≈ 1.1 s per iteration on one
# core, ≈ 0.75 s on two). Far below the paper's 50 000: the table says so, and a GPU session can raise
# them (every cell of a protocol must then be retrained to the new budget).
PROTOCOLS = (
    Protocol("ct2mr", "Dataset501_AbdomenCT", "Dataset502_AbdomenMRT2", "all", "abdomen_ct_src_cpu.yaml", 4000,
             fixed=(("loss", "gdl"),)),
    Protocol("mr2ct", "Dataset502_AbdomenMRT2", "Dataset501_AbdomenCT", "all", "abdomen_mr_src_cpu.yaml", 3000,
             fixed=(("loss", "gdl_ce"),)),
    Protocol("bssfp2lge", "Dataset503_CardiacBSSFP", "Dataset504_CardiacLGE", "test",
             "cardiac_bssfp_src_cpu.yaml", 3000, in_domain_train_split=None, fixed=(("loss", "gdl"),)),
    # Recipe v2 (docs/recipe-v2.md) at its budget, 12 000 iterations: no appearance augmentation against
    # SRC. The SRC cells are the bundled models' own training runs (``adopt``), the in-domain references
    # their reverse protocols' SRC cells, as above; only the ``none`` cells are trained for the ablation.
    Protocol("ct2mr-v2", "Dataset501_AbdomenCT", "Dataset502_AbdomenMRT2", "all", "abdomen_ct_src_v2_cpu.yaml",
             12000, fixed=(("loss", "gdl_ce"),), methods=("none", "src"), generation="v2", task="ct2mr"),
    Protocol("mr2ct-v2", "Dataset502_AbdomenMRT2", "Dataset501_AbdomenCT", "all", "abdomen_mr_src_v2_cpu.yaml",
             12000, fixed=(("loss", "gdl_ce"),), methods=("none", "src"), generation="v2", task="mr2ct"),
    Protocol("bssfp2lge-v2", "Dataset503_CardiacBSSFP", "Dataset504_CardiacLGE", "test",
             "cardiac_bssfp_src_v2_cpu.yaml", 12000, in_domain_train_split=None, fixed=(("loss", "gdl_ce"),),
             methods=("none", "src"), generation="v2", task="bssfp2lge"),
)


@dataclass(frozen=True)
class Run:
    name: str
    protocol: Protocol
    method: str
    in_domain: bool = False

    @property
    def run_dir(self) -> Path:
        return REPO / "runs" / "ablation" / self.name

    @property
    def package_dir(self) -> Path:
        return self.run_dir / "package"

    @property
    def eval_dir(self) -> Path:
        return REPO / "eval" / "ablation" / self.name

    @property
    def result_file(self) -> Path:
        return RESULTS / f"{self.name}.json"

    @property
    def iterations(self) -> int:
        if self.in_domain and self.protocol.reverse is not None:
            return self.protocol.reverse.iterations
        return self.protocol.iterations

    @property
    def recipe(self) -> str:
        if self.in_domain and self.protocol.reverse is not None:
            return self.protocol.reverse.recipe
        return self.protocol.recipe

    def overrides(self) -> dict:
        recipe_protocol = self.protocol.reverse if self.in_domain and self.protocol.reverse else self.protocol
        o = dict(recipe_protocol.fixed)
        o |= {"augmentation": self.method, "output_dir": str(self.run_dir), "iterations": self.iterations,
              "model.id": f"ablation-{self.name}", "model.name": f"Ablation {self.name}"}
        if self.in_domain:
            o["dataset"] = str(DATA / self.protocol.target)
            o["train_split"] = self.protocol.in_domain_train_split
        if self.name in RESEEDED:
            o["seed"] = RESEEDED[self.name][0]
        return o

    @property
    def eval_dataset(self) -> Path:
        return DATA / self.protocol.target

    @property
    def eval_split(self) -> str:
        return self.protocol.in_domain_split if self.in_domain else self.protocol.target_split

    @property
    def label(self) -> str:
        return "in-domain (src)" if self.in_domain else self.method

    def config(self, device: str = "auto"):
        from .config import load_config

        overrides = dict(self.overrides(), device=device)
        return load_config(REPO / "train" / "recipes" / self.recipe, overrides).resolve_paths(REPO)


def plan() -> list[Run]:
    runs = []
    for p in PROTOCOLS:
        for m in p.methods:
            runs.append(Run(f"{p.name}-{m}", p, m))
        runs.append(Run(f"{p.name}-indomain", p, "src", in_domain=True))
    return runs


def find(name: str) -> Run:
    for run in plan():
        if run.name == name:
            return run
    raise SystemExit(f"no ablation run named {name!r}; see `python -m train.ablation plan`")


def _iteration(run_dir: Path) -> int:
    state = run_dir / "checkpoint.json"
    return int(json.loads(state.read_text(encoding="utf-8"))["iteration"]) if state.is_file() else 0


def _unavailable(run: Run) -> str | None:
    """Why a cell cannot be measured on these data (None: it can)."""
    if run.in_domain and run.protocol.in_domain_train_split is None:
        return (f"{run.protocol.target} has no training split in this protocol (its cases are the test "
                f"set); an in-domain reference needs a cross-validation the protocol does not define")
    return None


def record(run: Run, summary: dict | None, iterations: int, provenance: dict[str, Any],
           recorded: str | None = None) -> Path:
    """Write the cell's committed record (atomically): its evaluation summary (None: not measured, see
    :func:`abandon`), where it came from and when it was recorded (default: today)."""
    data = {"cell": run.name, "protocol": run.protocol.name, "method": run.method, "in_domain": run.in_domain,
            "budget": run.iterations, "iterations": iterations,
            "recorded": recorded or datetime.date.today().isoformat(), "provenance": provenance, "summary": summary}
    from SRCSMSegmenterLib.image import atomic_output

    with atomic_output(run.result_file) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")
    return run.result_file


def result(run: Run) -> dict | None:
    """The cell's committed record, or None while it is not finished."""
    return json.loads(run.result_file.read_text(encoding="utf-8")) if run.result_file.is_file() else None


def _log_rows(log_csv: Path) -> list[dict[str, str]] | None:
    """The rows of a run's ``log.csv`` (None if there is none)."""
    if not log_csv.is_file():
        return None
    with open(log_csv, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def training_facts(log_csv: Path, early: int = 200) -> str:
    """What a run's log says about its state, for a cell stopped before its budget: the last validation
    mean Dice and the gradient norm's rise (last logged vs the median of the first ``early`` iterations)."""
    import statistics

    rows = _log_rows(log_csv)
    if rows is None:
        return "no training log"
    parts = []
    val = [(int(r["iteration"]), float(r["val_dice_mean"])) for r in rows if r.get("val_dice_mean")]
    if val:
        parts.append(f"validation mean Dice {val[-1][1]:.3f} at iteration {val[-1][0]}")
    norms = [(int(r["iteration"]), float(r["grad_norm"])) for r in rows if r.get("grad_norm")]
    first = [n for it, n in norms if it <= early]
    if first and norms:
        parts.append(f"gradient norm {statistics.median(first):.3g} (median of iterations ≤ {early}), "
                     f"{norms[-1][1]:.3g} at iteration {norms[-1][0]}")
    losses = [(int(r["iteration"]), float(r["loss"])) for r in rows if r.get("loss")]
    if losses:
        parts.append(f"loss {losses[-1][1]:.3f} at iteration {losses[-1][0]}")
    return "; ".join(parts) or "nothing logged"


def abandon(run: Run, reason: str) -> Path:
    """Record that the cell is not measured, why, and where its training stood (from its log); the plan
    then skips it. For a run that cannot give a meaningful number at its budget (it diverged), so that
    the table states a reason instead of showing a cell as unfinished. Remove the record to train it."""
    if not reason.strip():
        raise ValueError("give the reason the cell is not measured (--reason)")
    if result(run) is not None:
        raise ValueError(f"{run.result_file} already records the cell {run.name}; remove it first to replace it")
    return record(run, None, _iteration(run.run_dir),
                  {"kind": "not measured", "reason": reason.strip(),
                   "training": training_facts(run.run_dir / "log.csv")})


def twin(run: Run) -> Run | None:
    """The other cell whose model is trained identically, or None.

    The in-domain reference of a protocol trains on the target's training split with the reverse
    protocol's recipe and budget — exactly the reverse protocol's SRC cell (e.g. ``ct2mr-indomain`` and
    ``mr2ct-src`` are one MR-trained model, evaluated on the MR test split and on all CTs). One training
    serves both cells."""
    if run.in_domain:
        reverse = run.protocol.reverse
        return None if reverse is None else Run(f"{reverse.name}-src", reverse, "src")
    if run.method == "src":
        reverse = run.protocol.reverse
        if reverse is not None and reverse.in_domain_train_split is not None:
            return Run(f"{reverse.name}-indomain", reverse, "src", in_domain=True)
    return None


def advance(run: Run, time_limit: float | None, device: str) -> bool:
    """Train/export/evaluate/record ``run`` as far as possible; True when it is recorded."""
    from .evaluate import evaluate_model
    from .export import export_run
    from .trainer import Trainer

    if _unavailable(run):
        return False
    if result(run) is not None:
        return True
    shared = twin(run)
    if not run.run_dir.exists() and shared is not None and (shared.package_dir / "model.json").is_file():
        # the same model was already trained for the twin cell: evaluate it here instead of retraining
        check_package(run, shared.package_dir)
        summary = _summary(run, shared.package_dir) or evaluate_model(
            shared.package_dir, run.eval_dataset, run.eval_dir, split=run.eval_split, device=device,
            postprocess="none")
        record(run, summary, run.iterations, {"kind": "trained by the plan", "shared_with": shared.name,
                                              "weights": "ema", "weights_dtype": "float32", "device": device})
        return True
    cfg = run.config(device)
    if _iteration(run.run_dir) < cfg.iterations:
        Trainer(cfg, resume=True).fit(time_limit_s=time_limit, until_iteration=cfg.iterations)
        if _iteration(run.run_dir) < cfg.iterations:
            return False
    if not (run.package_dir / "model.json").is_file():
        export_run(run.run_dir, run.package_dir)
    summary = _summary(run, run.package_dir)
    if summary is None:
        summary = evaluate_model(run.package_dir, run.eval_dataset, run.eval_dir, split=run.eval_split,
                                 device=device, postprocess="none")
    adopted = run.run_dir / "adopted_from.json"
    provenance = {"kind": "adopted run" if adopted.is_file() else "trained by the plan", "weights": "ema",
                  "weights_dtype": "float32", "device": device}
    if run.name in RESEEDED:
        provenance["seed"] = cfg.seed
    note = training_notes(run, cfg.seed)
    if note:
        provenance["note"] = note
    if adopted.is_file():
        provenance["source"] = json.loads(adopted.read_text(encoding="utf-8"))["source"]
    record(run, summary, _iteration(run.run_dir), provenance)
    return True


def training_notes(run: Run, seed: int) -> str | None:
    """What a cell's record must say about how its model was trained, read from its run log: a collapse
    or failure, dead episodes it recovered from, skipped steps, a model still learning at the budget,
    and the seed of a rerun (:data:`RESEEDED`)."""
    log_csv = run.run_dir / "log.csv"
    saved = run.run_dir / "config.json"  # the run's own settings; the plan's when it has none
    ema_decay = (json.loads(saved.read_text(encoding="utf-8")).get("ema_decay") if saved.is_file() else None) \
        or run.config("cpu").ema_decay
    notes = [n for n in (training_collapse(log_csv), recovered_episodes(log_csv),
                         ended_dead(log_csv, ema_decay), skipped_steps(log_csv),
                         still_learning(log_csv)) if n]
    if run.name in RESEEDED:
        notes.append(f"trained with seed {seed}: {RESEEDED[run.name][1]}.")
    return " ".join(n[:1].upper() + n[1:] for n in notes) or None  # sentences


def refresh_notes(run: Run) -> bool:
    """Rewrite the note of a recorded cell trained by the plan from its run log (kept in this checkout),
    without retraining or re-evaluating: for records made before a note was known. True if it changed."""
    rec = result(run)
    prov = (rec or {}).get("provenance", {})
    log_csv = run.run_dir / "log.csv"
    if rec is None or rec["summary"] is None or prov.get("kind") != "trained by the plan" \
            or prov.get("shared_with") or not log_csv.is_file():
        return False
    seed = json.loads((run.run_dir / "config.json").read_text(encoding="utf-8")).get("seed", 0)
    note = training_notes(run, seed)
    if note == prov.get("note"):
        return False
    provenance = {k: v for k, v in prov.items() if k != "note"} | ({"note": note} if note else {})
    record(run, rec["summary"], rec["iterations"], provenance, recorded=rec.get("recorded"))
    return True


def still_learning(log_csv: Path, rise: float = 0.1) -> str | None:
    """A sentence when the validation mean Dice rose by ``rise`` or more over the run's last validation
    interval: the model was still learning its own domain at the budget, so its cross-domain number
    says what the method reaches at this budget, not what it can reach. None otherwise."""
    rows = _log_rows(log_csv) or []
    val = [(int(r["iteration"]), float(r["val_dice_mean"])) for r in rows if r.get("val_dice_mean")]
    if len(val) < 2 or val[-1][1] - val[-2][1] < rise:
        return None
    curve = ", ".join(f"{d:.3f} at {it}" for it, d in val)
    return (f"still learning at its budget: validation mean Dice (source domain) {curve}; the number is what "
            f"the method reaches at this budget, not what it can reach.")


def training_collapse(log_csv: Path, loss_level: float = 0.9, failed_dice: float = 0.1) -> str | None:
    """A sentence describing a collapsed or failed run, or None.

    A run has *collapsed* when its last validation mean Dice collapsed against its best one
    (:func:`train.trainer.validation_collapsed`, the rule the trainer warns with); it has *failed* when
    its last validation mean Dice is below ``failed_dice`` and its loss stayed at ``loss_level`` or more
    to the end (it never learned, or fell back before its first validation). The sentence names the first
    logged iteration from which the loss stayed there (the generalised Dice loss saturates at 1 when the
    network predicts one class everywhere and its gradient vanishes), so a table never shows such a
    model's number as what the method can do."""
    from .trainer import validation_collapsed

    rows = _log_rows(log_csv)
    if rows is None:
        return None
    val = [(int(r["iteration"]), float(r["val_dice_mean"])) for r in rows if r.get("val_dice_mean")]
    if not val:
        return None
    best_it, best = max(val, key=lambda v: v[1])
    last_it, last = val[-1]
    losses = [(int(r["iteration"]), float(r["loss"])) for r in rows if r.get("loss")]
    since = None
    for it, loss in reversed(losses):
        if loss < loss_level:
            break
        since = it
    where = (f"; the loss stayed ≥ {loss_level} from iteration {since} on (one class predicted everywhere, "
             f"vanishing gradient)" if since is not None else "")
    if len(val) >= 2 and validation_collapsed(best, last):
        return (f"training collapsed: validation mean Dice {best:.3f} at iteration {best_it}, {last:.3f} at "
                f"{last_it}{where}. The number measures the collapsed model, not what the method can do at "
                f"this budget.")
    if last < failed_dice and since is not None:
        return (f"training failed: validation mean Dice {last:.3f} at iteration {last_it} (best {best:.3f} at "
                f"{best_it}){where}. The number measures a model that did not learn, not what the method can "
                f"do at this budget.")
    return None


def dead_episodes(log_csv: Path, min_rows: int = 3, max_gap: int = 5) -> list[tuple[int, int | None]]:
    """``(first, last)`` iterations of each stretch where a learned run sat dead — the loss at its ceiling
    with a vanishing gradient (:func:`train.trainer.looks_dead` on the logged window means) — for at least
    ``min_rows`` logged windows, merging stretches fewer than ``max_gap`` healthy windows apart; ``last``
    is None when the run was still dead at its last logged window."""
    from .trainer import LEARNED_LOSS, looks_dead

    rows = [r for r in _log_rows(log_csv) or [] if r.get("gdl") and r.get("grad_norm")]
    learned, flagged = False, []
    for r in rows:
        loss, norm = float(r["gdl"]), float(r["grad_norm"])
        flagged.append(learned and looks_dead(loss, norm))
        learned = learned or loss <= LEARNED_LOSS
    episodes: list[tuple[int, int | None]] = []
    i = 0
    while i < len(rows):
        if not flagged[i]:
            i += 1
            continue
        j = last = i
        while j < len(rows) and (flagged[j] or any(flagged[j:j + max_gap])):
            last = j if flagged[j] else last
            j += 1
        if sum(flagged[i:last + 1]) >= min_rows:
            end = None if last == len(rows) - 1 else int(rows[last]["iteration"])
            episodes.append((int(rows[i]["iteration"]), end))
        i = j
    return episodes


def recovered_episodes(log_csv: Path) -> str | None:
    """A sentence naming the dead episodes a run recovered from (those it did not recover from make it
    collapsed or failed: :func:`training_collapse`), or None."""
    recovered = [(a, b) for a, b in dead_episodes(log_csv) if b is not None]
    if not recovered:
        return None
    spans = ", ".join(f"{a}–{b}" for a, b in recovered)
    return (f"the loss sat at its ceiling with a vanishing gradient (one class everywhere) in iterations {spans}, "
            f"and training recovered from it.")


def ended_dead(log_csv: Path, ema_decay: float = 0.999) -> str | None:
    """A sentence when the optimiser's weights fell dead and stayed dead to the end of the log while the
    validation — which scores the EMA weights, the ones exported and measured — did not collapse (then
    :func:`training_collapse` speaks), or None. Such a cell measures an average taken just after a
    collapse: a somewhat longer budget would have measured a collapsed model."""
    episodes = dead_episodes(log_csv)
    if not episodes or episodes[-1][1] is not None or training_collapse(log_csv) is not None:
        return None
    rows = _log_rows(log_csv) or []
    start, last = episodes[-1][0], int(rows[-1]["iteration"])
    val = [(int(r["iteration"]), float(r["val_dice_mean"])) for r in rows if r.get("val_dice_mean")]
    held = f" (validation mean Dice {val[-1][1]:.3f} at iteration {val[-1][0]})" if val else ""
    span = f"{round(1 / (1 - ema_decay)):,}".replace(",", " ")  # the EMA's effective window
    return (f"the optimiser's weights fell dead at iteration ≈ {start} (loss at its ceiling, vanishing gradient: one "
            f"class everywhere) and were still dead at the end of the budget ({last}); the exported EMA weights, "
            f"an average over the last ≈ {span} steps, still segmented{held}, so the number "
            f"measures them — a longer budget would have measured a collapsed model.")


def skipped_steps(log_csv: Path, threshold: float = 0.01) -> str | None:
    """A sentence when more than ``threshold`` of the run's steps were skipped, or None.

    A skipped step (non-finite loss or gradient) advances the iteration count without training, so such
    a cell had fewer updates than its budget says. Counted from the log's per-window ``skipped`` means."""
    rows = [r for r in _log_rows(log_csv) or [] if r.get("skipped")]
    skipped, previous = 0.0, 0
    for r in rows:
        iteration = int(r["iteration"])
        skipped += float(r["skipped"]) * (iteration - previous)
        previous = iteration
    if not previous or skipped <= threshold * previous:
        return None
    return (f"{round(skipped)} of its {previous} steps ({skipped / previous:.0%}) were skipped for a non-finite "
            f"loss or gradient: the model had {previous - round(skipped)} updates, not {previous}.")


def _differences(run: Run, config: dict, iteration: int) -> list[str]:
    """Every way a trained model (its configuration and iteration) differs from the cell ``run``."""
    from .config import TrainConfig

    expected = run.config().model_dump(mode="json")
    got = TrainConfig.model_validate(config).model_dump(mode="json")  # older runs: defaults filled
    problems = [f"{k}: run has {got.get(k)!r}, the plan needs {expected[k]!r}"
                for k in _TRAINING_KEYS if got.get(k) != expected[k]]
    if expected.get("lr_schedule", "constant") != "constant" and got.get("iterations") != expected["iterations"]:
        # a decaying schedule is stretched over the run's iterations: stopping a longer run at the budget
        # is another training (a constant rate, v1, does not care)
        problems.append(f"iterations: the run's {got.get('lr_schedule')} learning-rate schedule spans "
                        f"{got.get('iterations')} iterations, the plan's {expected['iterations']}")
    if got.get("init_weights") or expected.get("init_weights"):
        # where a run starts is part of what it learned: a fine-tuned run is not a cell trained from
        # scratch, and its budget is not the cell's
        if got.get("init_weights_sha256") != expected.get("init_weights_sha256") or not got.get("init_weights_sha256"):
            problems.append(f"init_weights: the run starts from {got.get('init_weights')!r}, the plan from "
                            f"{expected.get('init_weights')!r} (pinned weights must agree)")
    if Path(got["dataset"]).name != Path(expected["dataset"]).name:
        problems.append(f"dataset: run trained on {Path(got['dataset']).name}, the plan needs "
                        f"{Path(expected['dataset']).name}")
    if iteration != run.iterations:
        problems.append(f"iteration: checkpoint is at {iteration}, the budget is {run.iterations} "
                        f"(compare methods only at equal budget)")
    return problems


def adopt(run: Run, source: Path) -> Path:
    """Copy the trained run ``source`` into the cell ``run`` after checking it is that cell.

    Raises ``ValueError`` naming every difference: a zoo run trained with other settings, on other data,
    or to another iteration must not stand in for an ablation cell."""
    source = Path(source)
    state = source / "checkpoint.json"
    if not state.is_file():
        raise ValueError(f"{source} has no checkpoint.json; give the folder of a training run")
    trained = json.loads(state.read_text(encoding="utf-8"))
    problems = _differences(run, trained["config"], trained["iteration"])
    if problems:
        raise ValueError(f"{source} is not the ablation cell {run.name}:\n  " + "\n  ".join(problems))
    if run.run_dir.exists():
        raise ValueError(f"{run.run_dir} already exists; remove it first to replace the cell")
    tmp = run.run_dir.with_name(f".{run.run_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("checkpoint.json", "checkpoint.safetensors", "config.json", "log.csv"):
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    (tmp / "adopted_from.json").write_text(json.dumps({"source": str(source.resolve())}, indent=2) + "\n",
                                           encoding="utf-8")
    tmp.replace(run.run_dir)
    return run.run_dir


def check_package(run: Run, package_path: str | os.PathLike[str]):
    """Load the model package and check, from the training configuration and iteration its card records,
    that it *is* the cell ``run``; return the package. Raises ``ValueError`` naming every difference.

    Beyond the training settings, the cell is evaluated on the EMA weights (what the plan exports), so a
    package holding the optimiser's weights (``export --weights raw``) is refused — in this project that
    is also the mark of a run whose objective changed mid-way (the MR zoo model 0.2.0)."""
    from SRCSMSegmenterLib.modelpackage import load_package

    from .export import run_config_of

    package = load_package(package_path)
    prov = package.card.provenance
    config = run_config_of(prov.config)
    problems = _differences(run, config, prov.iterations) if config else [
        "the card records no training configuration; only packages exported by `python -m train export` "
        "can stand in for a cell"]
    weights = prov.config.get("export_weights", "ema")
    if weights != "ema":
        problems.append(f"weights: the package holds the {weights!r} weights, the cells are evaluated on the "
                        f"EMA weights")
    if problems:
        raise ValueError(f"{package_path} is not the ablation cell {run.name}:\n  " + "\n  ".join(problems))
    return package


def adopt_package(run: Run, package_path: str | os.PathLike[str], device: str = "auto") -> Path:
    """Evaluate the package as the cell ``run`` (after :func:`check_package`) and record it."""
    from .evaluate import evaluate_model

    if result(run) is not None:
        raise ValueError(f"{run.result_file} already records the cell {run.name}; remove it first to replace it")
    package = check_package(run, package_path)
    # the network's own labels: the ablation compares trainings, not clean-ups
    summary = evaluate_model(package_path, run.eval_dataset, run.eval_dir, split=run.eval_split, device=device,
                             postprocess="none")
    return record(run, summary, package.card.provenance.iterations, {
        "kind": "adopted package", "package": package.id, "version": package.card.version,
        "weights_sha256": package.card.weights.sha256, "weights": "ema",
        "weights_dtype": package.card.provenance.config.get("export_weights_dtype", "float32"), "device": device})


def _summary(run: Run, package_dir: Path) -> dict | None:
    """The cell's finished evaluation, if it evaluated exactly the weights of ``package_dir``.

    An evaluation left in ``eval/`` by an earlier model of the same cell (a run redone with another
    seed) carries other weights: it is not reused, so a record never pairs a model with another model's
    numbers (summaries written before the weights' hash was stored are not trusted either)."""
    from SRCSMSegmenterLib.modelpackage import load_package

    f = run.eval_dir / "summary.json"
    if not f.is_file():
        return None
    summary = json.loads(f.read_text(encoding="utf-8"))
    if summary.get("weights_sha256") != load_package(package_dir).card.weights.sha256:
        print(f"{run.name}: {f} evaluated other weights than {package_dir}; evaluating again", flush=True)
        return None
    return summary


def _mean(summary: dict, setting: str, metric: str) -> float | None:
    return summary["settings"].get(setting, {}).get("mean", {}).get(metric)


def table(out_md: Path = REPO / "docs" / "ablation.md", figure: bool = True) -> Path:
    """Write the Markdown table (and, with ``figure``, a PNG beside it) from every finished evaluation."""
    f3 = lambda v: "–" if v is None or v != v else f"{v:.3f}"  # noqa: E731  (NaN: undefined, e.g. empty)
    f2 = lambda v: "–" if v is None or v != v else f"{v:.2f}"  # noqa: E731
    lines = ["# Cross-domain ablation (generated by `python -m train.ablation table`)", "",
             "Mean over labels and test cases, in each case's original grid. SM = source matching at test "
             "time. Budget = training iterations (equal within a protocol). Each measured row is recorded in "
             "`docs/ablation-results/<protocol>-<method>.json` with where it came from (*source*). ASSD '–': undefined "
             "(no label of the prediction had a surface to measure).", "",
             "| protocol | method | budget | iterations | Dice with SM | Dice without SM | ASSD with SM (mm) "
             "| ASSD without SM (mm) | source |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    results: dict[str, list[tuple[Run, dict]]] = {}
    notes: list[str] = []
    for run in plan():
        rec = result(run)
        iteration = rec["iterations"] if rec else _iteration(run.run_dir)
        head = f"| {run.protocol.name} | {run.label} | {run.iterations} | {iteration} |"
        reason = _unavailable(run)
        if reason:
            lines.append(f"{head} not measurable: {reason} | | | | |")
        elif rec is None:
            state = (f"training, resumes from its checkpoint at iteration {iteration}" if iteration
                     else "not started")
            if run.name in RESEEDED:
                state += f"; rerun with seed {RESEEDED[run.name][0]}: {RESEEDED[run.name][1]}"
            lines.append(f"{head} not finished ({state}) | | | | |")
        elif rec["summary"] is None:
            prov = rec["provenance"]
            lines.append(f"{head} not measured: {prov['reason']} (training stopped: {prov['training']}) | | | | |")
        else:
            s = rec["summary"]
            results.setdefault(run.protocol.name, []).append((run, s))
            prov = rec.get("provenance", {})
            source = _source_text(prov)
            if prov.get("note"):
                notes.append(f"{len(notes) + 1}. {run.name}: {prov['note']}")
                source += f" ({len(notes)})"
            lines.append(f"{head} {f3(_mean(s, 'with SM', 'dice'))} | {f3(_mean(s, 'without SM', 'dice'))} | "
                         f"{f2(_mean(s, 'with SM', 'assd'))} | {f2(_mean(s, 'without SM', 'assd'))} | {source} |")
    if notes:
        lines += ["", "Notes:", ""] + notes
    lines += ["", "## Best cross-domain setting per protocol, per organ (Dice)", ""]
    for p in PROTOCOLS:
        cross = [(r, s, setting) for r, s in results.get(p.name, []) if not r.in_domain
                 for setting in ("with SM", "without SM") if _mean(s, setting, "dice") is not None]
        ref = p.published
        ref_text = f" Published reference: {ref[0]} {ref[1]:.1f} % mean Dice." if ref else ""
        if not cross:
            lines.append(f"- **{p.name}**: no finished cross-domain evaluation.{ref_text}")
            continue
        run, s, setting = max(cross, key=lambda c: _mean(c[1], c[2], "dice"))
        organs = ", ".join(f"{v['name']} {v['dice']:.3f}" for k, v in s["settings"][setting].items() if k != "mean")
        lines.append(f"- **{p.name}**: {run.method} {setting} ({s['cases']} cases), mean "
                     f"{_mean(s, setting, 'dice'):.3f}: {organs}.{ref_text}")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    if figure and results:
        png = _figure(results, out_md.with_suffix(".png"))
        lines += ["", f"![Mean Dice per protocol and method]({png.name})"]
    tmp = out_md.with_name(f".{out_md.name}.partial")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out_md)
    return out_md


def _source_text(provenance: dict) -> str:
    kind = provenance.get("kind", "?")
    seed = f", seed {provenance['seed']}" if provenance.get("seed") is not None else ""
    if kind == "adopted package":
        return f"zoo package `{provenance.get('package')}` {provenance.get('version')}{seed}"
    if provenance.get("shared_with"):
        return f"{kind}{seed}: the model of `{provenance['shared_with']}`"
    return kind + seed


def _figure(results: dict[str, list[tuple[Run, dict]]], path: Path) -> Path:
    """Grouped bars: per protocol, mean Dice of every finished method with and without SM."""
    from .report import _new_figure, _save

    protocols = [p for p in PROTOCOLS if p.name in results]
    fig = _new_figure(4.2 * len(protocols), 3.6)
    for i, p in enumerate(protocols):
        ax = fig.add_subplot(1, len(protocols), i + 1)
        runs = results[p.name]
        x = range(len(runs))
        for offset, setting, colour in ((-0.2, "without SM", "#9e9e9e"), (0.2, "with SM", "#1f77b4")):
            ax.bar([v + offset for v in x], [_mean(s, setting, "dice") or 0.0 for _, s in runs], 0.4,
                   label=setting, color=colour)
        if p.published:
            ax.axhline(p.published[1] / 100, color="#d62728", lw=1, ls="--", label=p.published[0])
        ax.set_xticks(list(x), [r.label for r, _ in runs], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{p.name} (budget {p.iterations} it)", fontsize=10)
        ax.set_ylabel("mean Dice")
    # one legend above the panels: inside an axes it hid the tallest bars (the in-domain references)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.98), ncol=len(labels), fontsize=8,
               frameon=False)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("plan")
    r = sub.add_parser("run")
    r.add_argument("--only", action="append", default=[], help="run names (see plan); default: all in order")
    r.add_argument("--time-limit", type=float, default=None, help="seconds of training per run in this call")
    r.add_argument("--device", default="auto")
    a = sub.add_parser("adopt")
    a.add_argument("name", help="the cell, e.g. ct2mr-src (see plan)")
    a.add_argument("run_dir", help="a finished training run with exactly the cell's settings and budget")
    ap = sub.add_parser("adopt-package")
    ap.add_argument("name", help="the cell, e.g. ct2mr-src (see plan)")
    ap.add_argument("package", help="a model package (folder or .zip) exported from a run with the cell's "
                                    "settings and budget")
    ap.add_argument("--device", default="auto")
    ab = sub.add_parser("abandon")
    ab.add_argument("name", help="the cell, e.g. bssfp2lge-randconv (see plan)")
    ab.add_argument("--reason", required=True, help="why the cell is not measured (goes into the table)")
    sub.add_parser("notes", help="rewrite recorded cells' notes from their run logs in this checkout")
    sub.add_parser("table")
    args = p.parse_args(argv)
    if args.command == "notes":
        for run in plan():
            if refresh_notes(run):
                print(f"{run.name}: {result(run)['provenance'].get('note', 'note removed')}")
        return 0
    if args.command == "plan":
        for run in plan():
            rec = result(run)
            state = (_unavailable(run) and "not measurable"
                     or rec and ("recorded" if rec["summary"] is not None else "not measured (abandoned)")
                     or f"iteration {_iteration(run.run_dir)}")
            print(f"{run.name:<24} {run.recipe:<28} {run.method:<13} budget {run.iterations:<6} {state}")
        return 0
    if args.command == "run":
        for run in plan():
            if args.only and run.name not in args.only:
                continue
            try:
                done = advance(run, args.time_limit, args.device)
            except CancelledError as exc:
                print(f"{run.name}: stopped: {exc}", file=sys.stderr, flush=True)
                return 130
            except SRCSMError as exc:
                print(f"{run.name}: error: {exc}", file=sys.stderr, flush=True)
                return 2
            rec = result(run)
            iteration = rec["iterations"] if rec else _iteration(run.run_dir)
            state = ("not measured (abandoned)" if rec and rec["summary"] is None
                     else "complete" if done else "in progress")
            print(f"{run.name}: {state} (iteration {iteration})", flush=True)
        return 0
    if args.command in ("adopt", "adopt-package", "abandon"):
        try:
            if args.command == "abandon":
                print(f"recorded {args.name} as not measured: {abandon(find(args.name), args.reason)}")
            elif args.command == "adopt":
                print(f"adopted as {args.name}: {adopt(find(args.name), Path(args.run_dir))}")
            else:
                print(f"recorded {args.name}: {adopt_package(find(args.name), args.package, args.device)}")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
