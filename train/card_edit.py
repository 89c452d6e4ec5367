"""Edit top-level fields of a package folder's model card in place — the tools that measure a model
(``choose-postprocessing --write-card``, ``card-metrics --write-card``) write what they measured into
its card, so no number or choice in a card is typed by hand.

The edit is textual: only the named fields change, every other byte of model.json stays as it was
(other fields may have been edited by other tools, and a diff of a release shows exactly what was
measured); the result is validated as a model card before it atomically replaces the old one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from SRCSMSegmenterLib.modelpackage import MODEL_JSON, read_card_bytes

#: Card fields that decide what a measurement of a package measured (the rest — metrics, description,
#: performance — does not): a release's steps and a robustness run's finished cases are keyed on them.
MEASURED_CARD_FIELDS = ("weights", "inference", "postprocessing", "normalization", "spacing", "network")


def _set_field(text: str, key: str, value: Any, path: Path) -> str:
    """``text`` (a model.json) with its top-level ``key`` set to ``value``, as a text edit; a new field
    goes before ``provenance``."""
    lines = json.dumps(value, indent=2, ensure_ascii=False).splitlines()
    block = f'  "{key}": ' + "\n".join([lines[0]] + ["  " + line for line in lines[1:]])
    marker = f'\n  "{key}": '
    if marker in text:
        begin = text.index(marker) + 1
        value_at = text.index(marker) + len(marker)
        _, end = json.JSONDecoder().raw_decode(text, value_at)  # the end of the old value, whatever its type
        return text[:begin] + block + text[end:]
    anchor = '\n  "provenance": '
    if anchor not in text:
        raise ValueError(f"{path}: no top-level 'provenance' field to insert before; is it a model card?")
    at = text.index(anchor) + 1
    return text[:at] + block + ",\n" + text[at:]


def set_card_fields(package_dir: str | os.PathLike[str], fields: dict[str, Any]) -> Path:
    """Set top-level ``fields`` of a package folder's model.json, atomically (see the module)."""
    path = Path(package_dir) / MODEL_JSON
    if not path.is_file():
        raise ValueError(f"'{package_dir}' is not a model package folder (no model.json); only folders can be edited")
    text = path.read_text(encoding="utf-8")
    for key, value in fields.items():
        text = _set_field(text, key, value, path)
    data = json.loads(text)
    if any(data.get(k) != v for k, v in fields.items()):
        raise ValueError(f"{path}: the card's layout is unexpected; set {', '.join(fields)} by hand")
    read_card_bytes(text.encode("utf-8"), str(path))  # still a valid card, before anything is replaced
    tmp = path.with_name(f".{MODEL_JSON}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
