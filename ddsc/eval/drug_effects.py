"""The demo's saved ground truth: ``effect[cell line, drug, dose, gene]`` and its axes, found beside an MDS folder.

``ddsc.data.demo_data`` writes it (``ground_truth/effects.npz``: numeric arrays, no pickle;
``conditions.json``: the axis labels, the drugs' SMILES and what the data held out); ``ddsc.eval.ground_truth``
scores a model against it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EFFECTS_FILE = "effects.npz"
AXES_FILE = "conditions.json"


@dataclass
class DrugEffects:
    """``effect[line, drug, dose, gene]`` with its axis labels (drug 0 = the control)."""

    effect: np.ndarray  # float [L, D, C, G]
    cell_lines: list[str]
    drugs: list[str]
    doses: list[str]
    gene_ids: np.ndarray  # int64 [G] token ids
    source: str
    smiles: dict[str, str] = dataclasses.field(default_factory=dict)  # drug -> SMILES (older demos: none)
    held_out_drugs: list[str] = dataclasses.field(default_factory=list)  # drugs without cells in the data
    held_out_doses: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> DrugEffects:
        """From a ``ground_truth`` folder (``effects.npz`` + ``conditions.json``, as the demo writes them)."""
        folder = Path(path)
        for name in (EFFECTS_FILE, AXES_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: not a ground-truth folder (no {name}; see ddsc/data/demo_data.py)")
        with np.load(folder / EFFECTS_FILE, allow_pickle=False) as arrays:
            effect, gene_ids = arrays["effect"].astype(np.float64), arrays["gene_token_ids"].astype(np.int64)
        described = json.loads((folder / AXES_FILE).read_text())
        axes, held_out = described["axes"], described.get("held_out", {})
        truth = cls(
            effect,
            list(axes["cell_line_id"]),
            list(axes["drug"]),
            list(axes["dose"]),
            gene_ids,
            str(folder),
            dict(described.get("smiles", {})),
            list(held_out.get("drugs", [])),
            list(held_out.get("doses", [])),
        )
        expected = (len(truth.cell_lines), len(truth.drugs), len(truth.doses), len(gene_ids))
        if effect.shape != expected:
            raise ValueError(f"{folder / EFFECTS_FILE}: effect has shape {effect.shape}, axes say {expected}")
        return truth

    def split(self, drug: str, dose: str) -> str:
        """``seen``, ``unseen_drug``, ``unseen_dose`` or ``unseen_drug_and_dose`` (for the data's cells)."""
        unseen = [
            what for what, out in (("drug", drug in self.held_out_drugs), ("dose", dose in self.held_out_doses)) if out
        ]
        return "unseen_" + "_and_".join(unseen) if unseen else "seen"

    def gene_columns(self, gene_ids: np.ndarray) -> np.ndarray:
        """Column of each token id in ``effect`` (-1 for genes the ground truth does not cover)."""
        lookup = np.full(max(int(self.gene_ids.max()), int(np.max(gene_ids, initial=0))) + 1, -1)
        lookup[self.gene_ids] = np.arange(len(self.gene_ids))
        return lookup[gene_ids]


def find_ground_truth(data: Path) -> Path | None:
    """The demo's ground truth for MDS folder ``data``: ``data/ground_truth`` or, in the demo layout
    (``DIR/tahoe`` converted to ``DIR/mds``), ``data/../tahoe/ground_truth``; used only when its cell lines and
    drugs (but those it held out) are all labels of the dataset (a stale folder from another demo must not be
    picked up)."""
    labels_file = data / "labels.json"
    if not labels_file.is_file():
        return None
    labels = json.loads(labels_file.read_text())
    for folder in (data / "ground_truth", data.parent / "tahoe" / "ground_truth"):
        if (folder / EFFECTS_FILE).is_file() and (folder / AXES_FILE).is_file():
            described = json.loads((folder / AXES_FILE).read_text())
            axes, held_out = described["axes"], set(described.get("held_out", {}).get("drugs", []))
            if all(set(axes[c]) - held_out <= set(labels.get(c, [])) for c in ("cell_line_id", "drug")):
                return folder
    return None
