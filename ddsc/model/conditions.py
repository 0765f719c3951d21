"""Cell-level conditions: raw values -> the ``cond`` tensor -> one vector per cell for adaLN-Zero.

The ``cond`` tensor ``[B, W]`` holds a batch's conditions side by side, in ``model.conditions`` order, with
``width(spec)`` columns each:

- ``label``: 1 column, the label id from ``labels.json`` (0 = null).
- ``molecule``: a state (0 null, 1 a molecule), then the molecule's Morgan fingerprint bits
  (``ddsc.data.chemistry``).
- ``scalar``: a state (0 null, 1 a value, 2 exactly zero), then the encoded value (its log10 with ``log10``).

A row of zeros is the null of every condition, so ``torch.zeros_like(cond)`` is the unconditional input of
classifier-free guidance (``ddsc.diffusion.samplers``) whatever the kinds. The dtype is int64 when every
condition is a label (the layout from before molecules and scalars existed) and float32 otherwise.

Dose 0. The vehicle control (``DMSO_TF`` at dose 0) is a real condition, not a missing one, but log10(0) is
undefined. With ``log10`` a value of exactly 0 is therefore the state ``ZERO``, with a learned embedding of its
own (distinct from null); positive values go through Fourier features of their log10 and an MLP; negative
values are an error.

Precision. A float ``cond`` is an input of the DiT, which FSDP2 mixed precision casts to bf16 on entry:
states and fingerprint bits stay exact, a log10 dose is rounded to bf16's 3 significant digits (0.5 uM
becomes 0.5003 uM). The encoders' outputs are float32, like every term of the conditioning vector.

This file ships inside every Hugging Face export: it imports only the other shipped modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddsc.data.chemistry import morgan_fingerprint, tanimoto
from ddsc.model.config import ConditionConfig

NULL, VALUE, ZERO = 0, 1, 2


class ConditionValueError(ValueError):
    """A value condition ``name`` cannot encode; ``row`` says which one, so callers can name the cell."""

    def __init__(self, name: str, row: int, message: str):
        super().__init__(message)
        self.name, self.row = name, row


def width(spec: ConditionConfig) -> int:
    """Columns of ``spec`` in the ``cond`` tensor."""
    return {"label": 1, "molecule": 1 + spec.fingerprint_bits, "scalar": 2}[spec.kind]


def column_slices(specs: Sequence[ConditionConfig]) -> list[slice]:
    """Where each condition's columns are in the ``cond`` tensor."""
    ends = np.cumsum([0, *(width(s) for s in specs)]).tolist()
    return [slice(a, b) for a, b in zip(ends[:-1], ends[1:], strict=True)]


def cond_dtype(specs: Sequence[ConditionConfig]) -> torch.dtype:
    return torch.int64 if all(s.kind == "label" for s in specs) else torch.float32


def null_cond(specs: Sequence[ConditionConfig], n: int, device: torch.device | str = "cpu") -> Tensor:
    """The all-null ``cond`` tensor of ``n`` cells."""
    return torch.zeros(n, sum(width(s) for s in specs), dtype=cond_dtype(specs), device=device)


def encode_values(
    spec: ConditionConfig,
    values: Sequence[str],
    label_ids: Callable[[str, Sequence[str]], np.ndarray] | None = None,
    required: bool = False,
) -> np.ndarray:
    """One condition's columns ``[n, width(spec)]`` (float64) for raw values (strings, as in MDS metadata).

    ``""`` is the null value, or for molecules and scalars an error when ``required`` (training: a cell without
    its SMILES or dose is a data problem, not a request for the unconditional model; an empty label stays the
    null label, as before). Labels are looked up with ``label_ids(column, values)`` (``LabelVocab.encode``).
    Raises ``ConditionValueError`` naming the value.
    """
    values = [str(v) for v in values]
    out = np.zeros((len(values), width(spec)))
    if required and spec.kind != "label" and "" in values:
        raise ConditionValueError(spec.name, values.index(""), f"{spec.source} is missing (empty)")
    if spec.kind == "label":
        out[:, 0] = label_ids(spec.name, values)
        return out
    for row, value in enumerate(values):
        if value:
            out[row] = _encode_one(spec, value, row)
    return out


def _encode_one(spec: ConditionConfig, value: str, row: int) -> np.ndarray:
    if spec.kind == "molecule":
        try:
            bits = morgan_fingerprint(value, spec.fingerprint_radius, spec.fingerprint_bits)
        except ValueError:
            raise ConditionValueError(spec.name, row, f"{spec.source} {value!r} is not a valid SMILES string") from None
        return np.concatenate([[VALUE], bits])
    try:
        x = float(value)
    except ValueError:
        raise ConditionValueError(spec.name, row, f"{spec.source} {value!r} is not a number") from None
    if not math.isfinite(x) or (spec.log10 and x < 0):
        raise ConditionValueError(
            spec.name, row, f"{spec.source} {value!r} must be a finite number{' >= 0' * spec.log10}"
        )
    if spec.log10 and x == 0:
        return np.array([ZERO, 0.0])
    return np.array([VALUE, math.log10(x) if spec.log10 else x])


def encode_conditions(
    specs: Sequence[ConditionConfig],
    values: Mapping[str, Sequence[str]],
    n: int,
    label_ids: Callable[[str, Sequence[str]], np.ndarray] | None = None,
    required: bool = False,
) -> np.ndarray:
    """The ``cond`` array ``[n, W]`` of ``values`` (``{condition name: n values}``; a missing name is null)."""
    parts = [encode_values(s, values[s.name], label_ids, required) if s.name in values else None for s in specs]
    out = np.zeros((n, sum(width(s) for s in specs)))
    for part, where in zip(parts, column_slices(specs), strict=True):
        if part is not None:
            out[:, where] = part
    return out.astype(np.int64 if cond_dtype(specs) == torch.int64 else np.float32)


class LabelEncoder(nn.Embedding):
    """A table with one row per label; row 0 is the learned null label."""

    def __init__(self, spec: ConditionConfig, d_model: int):
        super().__init__(spec.num_labels + 1, d_model)

    def forward(self, columns: Tensor, drop: Tensor) -> Tensor:
        return super().forward(columns[:, 0].long().masked_fill(drop, NULL)).float()


class FeatureEncoder(nn.Module):
    """Features of a value through a small MLP; a learned vector for each other state (null, zero).

    The MLP's matmuls take their input in the weight's dtype (bf16 under FSDP mixed precision); the result is
    float32, like every term of the conditioning vector. (``states`` has a row for ``VALUE`` too, unused, so
    that the state indexes it directly.)
    """

    def __init__(self, in_features: int, d_model: int, states: int):
        super().__init__()
        self.states = nn.Embedding(states, d_model)
        self.mlp = nn.Sequential(nn.Linear(in_features, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def features(self, values: Tensor) -> Tensor:
        return values

    def forward(self, columns: Tensor, drop: Tensor) -> Tensor:
        state = columns[:, 0].long().masked_fill(drop, NULL)
        x = self.features(columns[:, 1:].float())
        encoded = self.mlp(x.to(self.mlp[0].weight.dtype)).float()
        return torch.where((state == VALUE)[:, None], encoded, self.states(state).float())


class MoleculeEncoder(FeatureEncoder):
    """Fingerprint bits -> MLP: structurally similar molecules start out with similar embeddings."""

    def __init__(self, spec: ConditionConfig, d_model: int):
        super().__init__(spec.fingerprint_bits, d_model, states=2)
        self.bit_dropout = spec.bit_dropout

    def features(self, values: Tensor) -> Tensor:
        """The bits, with ``bit_dropout`` applied in training (``ConditionConfig``)."""
        return F.dropout(values, self.bit_dropout, self.training)


class KernelMoleculeEncoder(nn.Module):
    """A learned vector per reference (training) drug; a molecule is their mix by Tanimoto similarity.

    ``softmax(sharpness x Tanimoto(molecule, references)) @ vectors``: a seen drug (similarity 1 to itself,
    typically under 0.6 to the others) is almost its own vector, as with a label; an unseen drug is a mix of
    its nearest seen ones, with weights the fingerprints fix. In training, ``reference_dropout`` leaves a cell's
    own drug out of its mix (``ConditionConfig``). The reference fingerprints are computed from the config's
    SMILES when the model is built (a buffer, not a parameter: no state-dict entry); similarities and the mix
    are computed in float32 whatever the parameters' and buffers' dtype.
    """

    def __init__(self, spec: ConditionConfig, d_model: int):
        super().__init__()
        if len(spec.references) < 2:
            raise ValueError(f"model.conditions.{spec.name}: a kernel encoder needs >= 2 references")
        self.sharpness, self.reference_dropout = spec.kernel_sharpness, spec.reference_dropout
        fingerprints = [morgan_fingerprint(s, spec.fingerprint_radius, spec.fingerprint_bits) for s in spec.references]
        self.register_buffer("references", torch.tensor(np.stack(fingerprints), dtype=torch.float32), persistent=False)
        self.vectors = nn.Embedding(len(spec.references), d_model)  # a table, initialised as the label tables
        self.states = nn.Embedding(2, d_model)

    def forward(self, columns: Tensor, drop: Tensor) -> Tensor:
        state = columns[:, 0].long().masked_fill(drop, NULL)
        references = self.references.float()  # float32 even when the whole module was cast (DeepSpeed bf16)
        similarity = tanimoto(columns[:, 1:].float(), references)
        if self.training and self.reference_dropout > 0:
            own = similarity >= 1.0 - 1e-6
            others = (~own).any(-1, keepdim=True)  # never leave a mix empty
            left_out = own & others & (torch.rand(own.shape[0], 1, device=own.device) < self.reference_dropout)
            similarity = similarity.masked_fill(left_out, -math.inf)
        weights = torch.softmax(self.sharpness * similarity, dim=-1)
        encoded = weights @ self.vectors.weight.float()
        return torch.where((state == VALUE)[:, None], encoded, self.states(state).float())


class ScalarEncoder(FeatureEncoder):
    """sin/cos features of the (log) value at octave-spaced frequencies (1/8 to 8 cycles per unit) -> MLP.

    The low frequencies make the embedding a smooth function of the value, which is what lets a dose between
    (or near) the training doses be asked for.
    """

    def __init__(self, spec: ConditionConfig, d_model: int):
        super().__init__(2 * spec.fourier_features, d_model, states=3)
        self.fourier_features = spec.fourier_features

    def features(self, values: Tensor) -> Tensor:
        cycles = 2.0 ** torch.linspace(-3.0, 3.0, self.fourier_features, device=values.device)
        angles = 2 * math.pi * values[:, :1] * cycles[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


ENCODERS: dict[str, type[nn.Module]] = {"label": LabelEncoder, "molecule": MoleculeEncoder, "scalar": ScalarEncoder}


def condition_encoder(spec: ConditionConfig, d_model: int) -> nn.Module:
    """The module mapping ``spec``'s columns and a drop mask ``[B]`` to its term ``[B, d_model]`` (float32)."""
    if spec.kind == "molecule" and spec.encoder == "kernel":
        return KernelMoleculeEncoder(spec, d_model)
    return ENCODERS[spec.kind](spec, d_model)
