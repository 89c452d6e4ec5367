"""What the model picker shows: one entry per catalogue model and its model card as HTML.

The card answers what a user must know before trusting a result: what the model segments, which
modality it was trained on (so what source matching maps to), on which data and under which terms,
how accurate it measured, and how long it takes. All of it comes from ``model.json`` (the
catalogue is data); nothing is hard-coded per model here.
"""

from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog import Catalog, CatalogEntry, DownloadableModel
from .modelpackage import ModelCard


@dataclass(frozen=True)
class ModelChoice:
    """One item of the model picker."""

    id: str
    name: str
    origin: str  # bundled | installed | downloadable
    path: Path | None
    card: ModelCard | None
    download: DownloadableModel | None = None

    @property
    def available(self) -> bool:
        """Usable now (a readable package on disk)."""
        return self.path is not None and self.card is not None

    @property
    def label(self) -> str:
        """Text of the picker item."""
        if self.card is not None:
            text = f"{self.card.name} ({self.card.source.modality})"
        else:
            text = self.name
        if self.origin == "downloadable":
            text += " — not installed"
        elif self.card is None:
            text += " — unreadable"
        return text

    def card_html(self) -> str:
        return model_card_html(self.card, self.origin, self.download, self.path)


def choice_from_entry(entry: CatalogEntry) -> ModelChoice:
    return ModelChoice(entry.id, entry.name, entry.origin, entry.path, entry.card, entry.download)


def list_models(catalog: Catalog | None = None) -> list[ModelChoice]:
    """Every model the catalogue knows: installed, then bundled, then downloadable (its own order)."""
    catalog = catalog or Catalog()
    return [choice_from_entry(e) for e in catalog.entries()]


# -------------------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return _e(value)


def _nested(value: Any, depth: int = 0) -> str:
    """A free-form metrics/performance dict as nested lists (keys as given, numbers rounded)."""
    if isinstance(value, dict):
        if not value:
            return "<i>none recorded</i>"
        items = "".join(f"<li><b>{_e(k)}</b>: {_nested(v, depth + 1)}</li>" for k, v in value.items())
        return f"<ul style='margin-top:0;margin-bottom:0'>{items}</ul>"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) if not isinstance(v, (dict, list)) else _nested(v, depth + 1) for v in value)
    return _fmt_value(value)


def source_text(card: ModelCard) -> str:
    """"CT", or "MR (T2-SPIR)" — the sequence only when it says more than the modality."""
    seq = card.source.sequence
    return card.source.modality + (f" ({seq})" if seq and seq.strip().upper() != card.source.modality else "")


def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)) and not any(isinstance(v, (dict, list)) for v in value):
        return ", ".join(_text_value(v) for v in value)
    return str(value)


_WORDS = {"dice": "Dice", "assd": "ASSD", "hd95": "HD95", "mr": "MR", "ct": "CT", "t2": "T2", "roi": "ROI",
          "chaos": "CHAOS", "btcv": "BTCV", "lge": "LGE", "bssfp": "bSSFP", "cpu": "CPU", "gpu": "GPU"}


def _key_text(key: Any) -> str:
    """``mean_assd_mm`` → ``mean ASSD (mm)``: card keys as words."""
    words = str(key).split("_")
    unit = words.pop() if len(words) > 1 and words[-1] in ("mm", "s", "ml", "gb", "mb") else None
    text = " ".join(_WORDS.get(w.lower(), w) for w in words)
    return f"{text} ({unit.replace('gb', 'GB').replace('mb', 'MB')})" if unit else text


def _text_tree(value: Any, indent: str) -> list[str]:
    """A free-form metrics/performance dict as indented lines; keys' underscores read as spaces."""
    lines = []
    for key, v in value.items():
        name = _key_text(key)
        if isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()) and len(v) <= 6:
            pairs = ", ".join(f"{_key_text(k)} {_text_value(x)}" for k, x in v.items())
            lines.extend(_wrapped(f"{name}: {pairs}", indent))
        elif isinstance(v, dict):
            lines.append(f"{indent}{name}:")
            lines.extend(_text_tree(v, indent + "  ") if v else [f"{indent}  none recorded"])
        else:
            lines.extend(_wrapped(f"{name}: {_text_value(v)}", indent))
    return lines


def _wrapped(text: str, indent: str = "  ") -> list[str]:
    """One field of the text card, wrapped at 100 columns; continuation lines indented two more, so a
    terminal or a log shows each field as a block, whatever its length (descriptions, chosen-by texts)."""
    return textwrap.wrap(text, 100, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_long_words=False, break_on_hyphens=False)


def training_text(card: ModelCard) -> str:
    """How the weights were trained: appearance augmentation, iterations and date — and for a fine-tune
    (its card's ``provenance.config.init_weights_from``) which package it started from, so the total is
    not read as one run from scratch."""
    prov = card.provenance
    text = f"{prov.augmentation}, {prov.iterations} iterations"
    start = (prov.config or {}).get("init_weights_from")
    if isinstance(start, dict) and start.get("id"):
        before = start.get("iterations")
        own = f"{prov.iterations - int(before)} " if isinstance(before, int) and before < prov.iterations else ""
        text += (f" ({own}fine-tuning {start['id']} {start.get('version') or ''}".rstrip()
                 + (f", which had {before})" if before else ")"))
    return f"{text}, {prov.date}"


def inference_text(card: ModelCard) -> str:
    """How the network runs over a scan, as the card says (``inference.strategy``)."""
    inf = card.inference
    window = (f"sliding window of {' × '.join(map(str, card.patch_size))} voxels, {inf.overlap:.0%} overlap, "
              f"{inf.blend_mode} blending")
    padding = ("; a grid thinner than the window is padded with its edge voxels (replicate)"
               if getattr(inf, "padding_mode", "constant") == "replicate" else "")
    if getattr(inf, "strategy", "sliding_window") == "whole_grid":
        return (f"one pass over the whole model grid (up to {inf.max_grid_voxels / 1e6:g} M voxels; "
                f"larger grids: {window}){padding}")
    return window + padding


def model_card_text(card: ModelCard, origin: str = "", path: Path | None = None) -> str:
    """The model card as plain text (``srcsm models info``): the same content as :func:`model_card_html`."""
    spacing = " × ".join(f"{s:g}" for s in card.spacing)
    # the folder on a line of its own: a path is the one field that cannot wrap, and an install path is as long
    # as the machine makes it (a CI checkout's made the id line 104 columns)
    out = [f"{card.name}", f"  id {card.id}, version {card.version}" + (f" ({origin})" if origin else ""),
           *([f"  folder:      {path}"] if origin and path else []),
           "", *textwrap.wrap(card.description, 100, initial_indent="  ", subsequent_indent="  "), "",
           *_wrapped(f"anatomy:     {card.anatomy}"),
           *_wrapped(f"trained on:  {source_text(card)} — source matching maps other images onto this"),
           *_wrapped("labels:      " + ", ".join(f"{lab.value} {lab.name}" for lab in card.labels.labels)),
           *_wrapped(f"model grid:  {spacing} mm, patch {' × '.join(map(str, card.patch_size))}, "
                     f"network {card.network.architecture}"),
           *_wrapped(f"inference:   {inference_text(card)}" + (
               f" ({card.inference.chosen_by})" if getattr(card.inference, "chosen_by", None) else "")),
           *_wrapped(f"padding:     {card.inference.padding_mode} ({card.inference.padding_chosen_by})")
           * bool(getattr(card.inference, "padding_chosen_by", None)),
           *_wrapped(f"training:    {training_text(card)}"),
           *_wrapped(f"licence:     {card.license}")]
    post = getattr(card, "postprocessing", None)
    if post is not None:
        chosen_by = f" ({post.chosen_by})" if post.chosen_by else ""
        out += _wrapped(f"default clean-up: {post.describe()}{chosen_by}")
    for d in card.training_data:
        cases = f", {d.cases} cases" if d.cases else ""
        out += _wrapped(f"data:        {d.name}{cases} — terms: {d.terms}")
    stats = card.training_label_stats
    if stats is not None:
        out += _wrapped(f"training label volumes ({stats.cases} cases): " + "; ".join(
            f"{name} {s.volume_ml[0]:.0f}–{s.volume_ml[1]:.0f} ml" for name, s in stats.labels.items()))
    fov = getattr(card, "field_of_view", None)
    if fov is not None:
        out += _wrapped(f"field of view: {fov.summary()}")
    out += ["", "  measured accuracy:"] + (_text_tree(card.metrics, "    ") or ["    none recorded"])
    out += ["", "  expected time and memory:"] + (_text_tree(card.performance, "    ") or ["    none recorded"])
    return "\n".join(out)


def run_summary(card: ModelCard, modality: str, detected: bool, source_matching: bool,
                default_model: bool = False) -> str:
    """What a run is about to do, in one sentence: which model (and whether it was the default) and how the
    input is read — shown before the work starts, so that a wrong model or modality is seen, not guessed."""
    model = (f"Model {card.id} {card.version}: {card.anatomy} ({', '.join(card.labels.names())}), trained on "
             f"{source_text(card)}" + (" — the default; choose another with --model" if default_model else ""))
    how = "detected from its intensities; set it with --target-modality" if detected else "as given"
    if source_matching:
        action = f"source-matched to the model's {card.source.modality} intensities"
    else:
        action = "not source-matched"
    return f"{model}. Input read as {modality} ({how}), {action}."


def _swatch(color: tuple[float, float, float]) -> str:
    r, g, b = (round(c * 255) for c in color)
    return f"<span style='background-color:#{r:02x}{g:02x}{b:02x}'>&nbsp;&nbsp;&nbsp;&nbsp;</span>"


def model_card_html(card: ModelCard | None, origin: str = "", download: DownloadableModel | None = None,
                    path: Path | None = None) -> str:
    """The model card: anatomy, source modality, labels, training data + terms, licence, measured
    accuracy and time. Works for downloadable entries (no card yet) and unreadable packages too."""
    if card is None:
        if download is not None:
            size = f" ({download.size_bytes / 1e6:.0f} MB)" if download.size_bytes else ""
            return (f"<h3>{_e(download.name)}</h3><p>{_e(download.description)}</p>"
                    f"<p><b>Not installed.</b> Download the package{size} from <a href='{_e(download.url)}'>"
                    f"{_e(download.url)}</a> and use <i>Install model from file…</i>, or run "
                    f"<code>srcsm models install {_e(download.id)}</code>.</p>"
                    + (f"<p><b>Licence:</b> {_e(download.license)}</p>" if download.license else ""))
        return (f"<h3>Unreadable model package</h3><p>The package at <code>{_e(path)}</code> could not be read. "
                f"Run <code>srcsm models info {_e(path)}</code> for the reason, and reinstall it.</p>")
    src = source_text(card)
    labels = "".join(
        f"<li>{_swatch(lab.color)} {lab.value}: {_e(lab.name)} "
        f"<small>(SNOMED-CT {_e(lab.terminology.type.code)} {_e(lab.terminology.type.meaning)}"
        + (f", {_e(lab.terminology.type_modifier.meaning)}" if lab.terminology.type_modifier else "")
        + ")</small></li>"
        for lab in card.labels.labels)
    data = "".join(
        f"<li>{_e(d.name)}" + (f", {d.cases} cases" if d.cases else "")
        + f". <i>Terms:</i> {_e(d.terms)}"
        + (f" <a href='{_e(d.url)}'>link</a>" if d.url else "")
        + (f"<br><small>{_e(d.citation)}</small>" if d.citation else "") + "</li>"
        for d in card.training_data)
    spacing = " × ".join(f"{s:g}" for s in card.spacing)
    origin_text = {"bundled": "bundled with the extension", "installed": "installed by you"}.get(origin, origin)
    parts = [
        f"<h3>{_e(card.name)} <small>{_e(card.version)}</small></h3>",
        f"<p>{_e(card.description)}</p>",
        "<table cellspacing='2'>",
        f"<tr><td><b>Anatomy</b></td><td>{_e(card.anatomy)}</td></tr>",
        f"<tr><td><b>Trained on</b></td><td>{_e(src)} — source matching maps other images onto this</td></tr>",
        f"<tr><td><b>Model grid</b></td><td>{spacing} mm, patch {' × '.join(map(str, card.patch_size))}</td></tr>",
        f"<tr><td><b>Inference</b></td><td>{_e(inference_text(card))}</td></tr>",
        f"<tr><td><b>Training</b></td><td>{_e(training_text(card))}</td></tr>",
        f"<tr><td><b>Licence</b></td><td>{_e(card.license)}</td></tr>",
        (f"<tr><td><b>Field of view</b></td><td>{_e(card.field_of_view.summary())}</td></tr>"
         if getattr(card, "field_of_view", None) is not None else ""),
        (f"<tr><td><b>Model id</b></td><td><code>{_e(card.id)}</code>"
         + (f" ({_e(origin_text)})" if origin_text else "") + "</td></tr>"),
        "</table>",
        f"<p><b>Labels</b></p><ul style='margin-top:0'>{labels}</ul>",
        f"<p><b>Training data</b></p><ul style='margin-top:0'>{data}</ul>",
        f"<p><b>Measured accuracy</b></p>{_nested(card.metrics)}",
        f"<p><b>Expected time and memory</b></p>{_nested(card.performance)}",
    ]
    return "\n".join(parts)


__all__ = ["ModelChoice", "choice_from_entry", "list_models", "model_card_html", "model_card_text", "run_summary",
           "source_text"]
