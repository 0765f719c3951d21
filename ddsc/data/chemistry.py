"""Molecules as Morgan fingerprints (RDKit), computed once per SMILES string.

A ``molecule`` condition feeds the model a drug's structure instead of its name, so a drug never seen in
training can still be asked for. The fingerprint is the folded Morgan (ECFP-like) bit vector, by default radius 2
and 2,048 bits (``ConditionConfig.fingerprint_radius`` / ``fingerprint_bits``, saved with the model). A dataset
has few distinct drugs (Tahoe-100M: 379) and many cells, so fingerprints are cached per (SMILES, settings).

This file ships inside every Hugging Face export, so it needs nothing from the rest of the package; RDKit is
imported inside ``try`` so that the export loads where RDKit is not installed (transformers skips ``try``
imports when it checks a remote module's requirements), and only fingerprinting then fails, saying so.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

try:
    from rdkit import Chem, DataStructs, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")  # unparsable SMILES are reported by our own error, not RDKit's stderr
except ImportError:
    Chem = None

RDKIT_MISSING = "molecule conditions need RDKit to fingerprint SMILES: pip install rdkit"


@lru_cache(maxsize=65_536)
def _fingerprint(smiles: str, radius: int, bits: int) -> np.ndarray | None:
    molecule = Chem.MolFromSmiles(smiles) if smiles else None
    if molecule is None:
        return None
    vector = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits).GetFingerprint(molecule)
    out = np.zeros(bits, dtype=np.uint8)
    DataStructs.ConvertToNumpyArray(vector, out)
    out.flags.writeable = False  # cached and shared: callers must copy before writing
    return out


def morgan_fingerprint(smiles: str, radius: int = 2, bits: int = 2048) -> np.ndarray:
    """Folded Morgan fingerprint of ``smiles`` as a read-only uint8 0/1 array [bits]; ValueError if unparsable."""
    if Chem is None:
        raise ImportError(RDKIT_MISSING)
    out = _fingerprint(str(smiles), radius, bits)
    if out is None:
        raise ValueError(f"{smiles!r} is not a valid SMILES string")
    return out


def tanimoto(a, b):
    """Tanimoto similarity of 0/1 fingerprints: rows of ``a`` [n, bits] against rows of ``b`` [m, bits] -> [n, m].

    NumPy arrays (any dtype, 1-D for one fingerprint; a float64 result) or float torch tensors (2-D: the
    kernel molecule encoder, on the model's device), by the same formula; an all-zero row has similarity 0.
    """
    if isinstance(a, np.ndarray):
        a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    common = a @ b.T
    return common / (a.sum(-1)[:, None] + b.sum(-1)[None, :] - common).clip(min=1.0)
