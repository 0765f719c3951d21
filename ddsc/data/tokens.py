"""The token scheme: the one place that defines gene and expression token ids.

A cell is ``[<cls>] + up to max_length genes``. Each position carries two tokens: the gene id (always
visible, it conditions the model) and the expression token (a bin, or a special value). Everything else
imports these constants; nothing hard-codes the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

# Gene vocabulary: identical to Tahoe-100M's token ids, so Tahoe shards map to themselves.
GENE_PAD = 0
GENE_CLS = 1
GENE_EOC = 2
FIRST_GENE_ID = 3
GENE_SPECIALS = {"<pad>": GENE_PAD, "<cls>": GENE_CLS, "<eoc>": GENE_EOC}


@dataclass(frozen=True)
class ExpressionTokens:
    """Expression vocabulary for ``num_bins`` bins: ``0..K-1`` are bins, then mask, pad and cls.

    The output head predicts the ``K`` bins only: the mask token can never be predicted (MDLM "SUBS").
    """

    num_bins: int

    @property
    def mask(self) -> int:
        return self.num_bins

    @property
    def pad(self) -> int:
        return self.num_bins + 1

    @property
    def cls(self) -> int:
        return self.num_bins + 2

    @property
    def vocab_size(self) -> int:
        return self.num_bins + 3
