"""Typed configuration of the DiT backbone, with size presets.

This module imports nothing from ``ddsc``: it ships verbatim inside every Hugging Face export (with the
DiT itself) so that ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` works without ``ddsc``.
Validation errors are plain ``ValueError``; the config loader adds the key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ConfigError = ValueError


ConditionKind = Literal["label", "molecule", "scalar"]


@dataclass
class ConditionConfig:
    """One cell-level condition that modulates every block through adaLN-Zero (``ddsc.model.conditions``).

    ``kind``: ``label`` (an id from ``labels.json``), ``molecule`` (a SMILES string -> Morgan fingerprint -> MLP,
    so drugs never seen in training can be asked for) or ``scalar`` (a number such as a dose -> Fourier features
    -> MLP, so unseen values can be asked for). ``name`` is how users address the condition (``ddsc generate
    --condition name=value``, AnnData ``obs``); ``column`` is the MDS metadata column training reads (default:
    ``name``; e.g. a molecule condition ``smiles`` reads ``canonical_smiles``). During training the condition is
    replaced by its learned null value with probability ``dropout``, which is what makes classifier-free guidance
    possible at sampling time, one condition at a time. A molecule's ``bit_dropout`` zeroes fingerprint bits at
    random in training (the others scaled up to keep the mean): with a few dozen training drugs the MLP can
    otherwise learn a drug from a bit only it has, which says nothing about a drug it has not seen.

    A molecule's ``encoder`` is ``mlp`` (fingerprint -> MLP) or ``kernel``: a learned vector per training drug
    (``references``, the SMILES of ``labels.json``, filled before building), and a molecule is the softmax mix,
    weighted by ``kernel_sharpness`` x Tanimoto similarity, of the references' vectors. A seen drug is then
    (almost) its own vector, as a label is; an unseen one is a mix of its nearest seen drugs. With
    ``reference_dropout`` a training cell's own drug is left out of the mix with that probability, which trains
    the vectors for exactly what an unseen drug asks of them: to be predicted from its neighbours.
    """

    name: str
    dropout: float = 0.1
    num_labels: int = 0  # label: real labels, without the null label (id 0); 0 = fill from the label vocabulary
    kind: ConditionKind = "label"
    column: str = ""
    fingerprint_radius: int = 2  # molecule: Morgan radius (ECFP4) ...
    fingerprint_bits: int = 2048  # ... folded to this many bits
    bit_dropout: float = 0.0  # molecule, training only: each fingerprint bit zeroed with this probability
    encoder: Literal["mlp", "kernel"] = "mlp"  # molecule: fingerprint -> MLP, or a Tanimoto mix of references
    references: list[str] = field(default_factory=list)  # kernel: the training drugs' SMILES; [] = from labels
    kernel_sharpness: float = 10.0  # kernel: softmax(sharpness x Tanimoto) over the references
    reference_dropout: float = 0.0  # kernel, training only: a cell's own drug left out of the mix
    log10: bool = True  # scalar: encode log10(value) (doses span decades); the value 0 gets its own embedding
    fourier_features: int = 16  # scalar: sin/cos pairs of the (log) value fed to the MLP

    def __post_init__(self) -> None:
        if self.kind not in ("label", "molecule", "scalar"):
            raise ConfigError(f"conditions.{self.name}.kind: must be label, molecule or scalar, got {self.kind!r}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ConfigError(f"conditions.{self.name}.dropout: must be in [0, 1], got {self.dropout}")
        if not 0.0 <= self.bit_dropout < 1.0:
            raise ConfigError(f"conditions.{self.name}.bit_dropout: must be in [0, 1), got {self.bit_dropout}")
        if self.encoder not in ("mlp", "kernel"):
            raise ConfigError(f"conditions.{self.name}.encoder: must be mlp or kernel, got {self.encoder!r}")
        if not 0.0 <= self.reference_dropout < 1.0:
            raise ConfigError(
                f"conditions.{self.name}.reference_dropout: must be in [0, 1), got {self.reference_dropout}"
            )
        for key in ("fingerprint_radius", "fingerprint_bits", "fourier_features", "kernel_sharpness"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"conditions.{self.name}.{key}: must be positive, got {getattr(self, key)}")

    @property
    def source(self) -> str:
        """The metadata column the condition is read from."""
        return self.column or self.name


# (d_model, n_layers, n_heads). "ddsc" is the size of the original DDSC model. Parameter counts (DiT.num_params,
# Tahoe gene vocabulary, 51 bins, no conditions) include the adaLN maps (6 d^2 per block, a third of each block).
TAHOE_GENE_VOCAB_SIZE = 62_710  # Tahoe-100M gene_metadata rows (ids 0..2 are specials): the presets' default
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 4),  # 4M (0.2M outside the embeddings)
    "small": (256, 4, 4),  # 21M
    "ddsc": (768, 12, 12),  # 177M (129M outside the embeddings)
    "large": (1024, 24, 16),  # 520M
    "xl": (1536, 22, 16),  # 1.04B (0.94B outside the embeddings)
}


@dataclass
class ModelConfig:
    """The DiT: gene embedding + expression embedding per position, no positional encoding."""

    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    gene_vocab_size: int = 0  # gene embedding rows; 0: a training run takes the data's vocab.json size
    num_bins: int = 51  # must equal data.binning.num_bins (checked by RunConfig)
    time_conditioning: bool = False  # MDLM's log-linear schedule works without t; optional
    # "unpadded": position-wise layers on real tokens only, attention without a mask when nothing is padding
    # (see ``ddsc.model.dit.Layout``); "masked": every position with a key-padding mask (the reference).
    attention: Literal["unpadded", "masked"] = "unpadded"
    conditions: list[ConditionConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.attention not in ("unpadded", "masked"):
            raise ConfigError(f"attention: must be 'unpadded' or 'masked', got {self.attention!r}")
        for name in ("d_model", "n_layers", "n_heads", "num_bins"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.gene_vocab_size < 0:
            raise ConfigError(f"gene_vocab_size: must be positive (or 0: from the data), got {self.gene_vocab_size}")

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> ModelConfig:
        if preset not in PRESETS:
            raise ConfigError(f"unknown model preset '{preset}' (choose from {', '.join(PRESETS)})")
        d_model, n_layers, n_heads = PRESETS[preset]
        overrides.setdefault("gene_vocab_size", TAHOE_GENE_VOCAB_SIZE)
        return cls(d_model=d_model, n_layers=n_layers, n_heads=n_heads, **overrides)
