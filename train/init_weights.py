"""Start a training run from a released model's weights (fine-tuning, as nnU-Net's ``-pretrained_weights``).

Why: a 12 000-iteration run takes ≈ 4.5 h of this 2-core CPU, longer than a working session, and the
run folder does not always survive to the next one. A recipe that changes only *what the network sees*
(recipe v3's thin slabs and paddings) can start from the bundled model trained with the earlier recipe
and train a few thousand iterations more, within one session. The package's weights are the EMA
weights it shipped; they start both the network and its EMA. The optimiser starts fresh (Adam's moments
are not shipped), which is what the recipe's warm-up is for.

The package must hold the recipe's network (architecture and parameters) and label table (values and
names), or the run refuses to start: weights of another network cannot be loaded, and weights trained
on other labels would teach the wrong classes under the right names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from SRCSMSegmenterLib.errors import SRCSMError
from SRCSMSegmenterLib.labels import LabelTable
from SRCSMSegmenterLib.modelpackage import load_package


class InitWeightsError(SRCSMError):
    """The recipe's ``init_weights`` package cannot start this run."""


def _label_pairs(table: LabelTable) -> list[tuple[int, str]]:
    return [(lab.value, lab.name) for lab in table.labels]


def load_init_weights(path: str | Path, network_spec: dict[str, Any], labels: LabelTable,
                      sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The package's weights as float32 tensors, and what the run records of them (id, version, the
    weights' sha256, the iterations they were trained for), after checking that they fit.

    ``network_spec`` is the run's ``{"architecture", "parameters"}`` with ``in_channels`` and
    ``out_channels`` filled in, as the trainer builds it; ``labels`` the run's dataset label table;
    ``sha256`` the weights the recipe expects (``init_weights_sha256``), if it pins them."""
    package = load_package(path)  # raises a ModelPackageError naming the problem for a bad package
    card = package.card
    where = f"init_weights '{path}' ({card.id} {card.version})"
    if sha256 is not None and card.weights.sha256 != sha256:
        raise InitWeightsError(
            f"{where} holds other weights than the recipe pins (sha256 {card.weights.sha256[:12]}… ≠ "
            f"{sha256[:12]}…): the package was replaced by another release. Point init_weights at the "
            f"release the recipe names (e.g. its staged or archived package), or update init_weights_sha256.")
    theirs = {"architecture": card.network.architecture, "parameters": dict(card.network.parameters)}
    if theirs != network_spec:
        raise InitWeightsError(
            f"{where} holds another network than the recipe's: {theirs} vs {network_spec}. "
            f"Start from a package of the same network, or remove init_weights to train from scratch.")
    if _label_pairs(card.labels) != _label_pairs(labels):
        raise InitWeightsError(
            f"{where} was trained on other labels than the recipe's dataset: {_label_pairs(card.labels)} vs "
            f"{_label_pairs(labels)}. Start from a package trained on the same label table.")
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in package.state_dict().items()}
    info = {"id": card.id, "version": card.version,
            "weights_sha256": card.weights.sha256,  # load_package checked the file against it
            "iterations": int(card.provenance.iterations),
            "path": str(path)}
    return tensors, info
