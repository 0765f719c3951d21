"""Binning: the vectorised batch implementation against per-cell references and closed forms."""

import math

import numpy as np
import pytest
import torch

from ddsc.data.binning import bin_counts, quantile_bins_reference
from ddsc.data.binning_config import BinningConfig


def padded_cells(seed: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative-binomial counts (many ties, like UMI data) in a padded [B, N] batch."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    counts = torch.zeros(len(lengths), width)
    real = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        counts[i, :n] = torch.from_numpy(rng.negative_binomial(1, 0.2, n) + 1).float()
        real[i, :n] = True
    return counts, real


@pytest.mark.parametrize("zero_fraction", [0.0, 0.2])
@pytest.mark.parametrize("num_bins", [5, 51])
@pytest.mark.parametrize("scale", [1.0, 37.0, 0.37], ids=["small-integers", "large-integers", "non-integers"])
def test_quantile_matches_per_cell_torch_quantile(num_bins, zero_fraction, scale):
    """Bit-identical to torch.quantile + bucketize, on the histogram path, the sorted path and their mix."""
    cfg = BinningConfig(method="quantile", num_bins=num_bins, zero_fraction=zero_fraction)
    counts, real = padded_cells(0, [1, 2, 7, 50, 300, 1024])
    counts = counts * scale
    counts[3, :10] = 0  # zero counts at real positions (user data listing unexpressed genes)
    bins = bin_counts(counts, real, cfg)
    for i in range(len(counts)):
        n = int(real[i].sum())
        assert torch.equal(bins[i, :n], quantile_bins_reference(counts[i, :n], cfg))
        assert (bins[i, n:] == 0).all()


def test_quantile_tie_rules():
    cfg = BinningConfig(method="quantile", num_bins=10)
    row = torch.tensor([[1.0, 1, 1, 1, 1, 2, 3, 3, 8, 100]])
    bins = bin_counts(row, torch.ones_like(row, dtype=torch.bool), cfg)[0]
    # Equal counts share a bin; the smallest count is bin 0; bins grow with counts.
    assert (bins[:5] == 0).all() and bins[6] == bins[7]
    assert (bins[1:] >= bins[:-1]).all()
    # Each bin is the number of decile edges strictly below the count: edges of [1x5, 2, 3, 3, 8, 100].
    edges = np.quantile(row[0].numpy(), np.arange(1, 10) / 10)
    assert bins.tolist() == [int((edges < v).sum()) for v in row[0].tolist()]


def test_zero_bin_reserved_when_zero_fraction():
    cfg = BinningConfig(method="quantile", num_bins=6, zero_fraction=0.1)
    counts, real = padded_cells(1, [40])
    counts[0, :5] = 0
    bins = bin_counts(counts, real, cfg)[0]
    assert (bins[:5] == 0).all()
    assert bins[5:].min() == 1 and bins[5:].max() == 5


def test_global_log1p_closed_form():
    cfg = BinningConfig(method="global_log1p", num_bins=20, target_sum=1e4, max_value=10.0)
    counts, real = padded_cells(2, [30, 200])
    bins = bin_counts(counts, real, cfg)
    for i in range(2):
        c = counts[i][real[i]].double().numpy()
        expected = np.clip(np.floor(np.log1p(c / c.sum() * 1e4) / 10.0 * 20), 0, 19)
        assert bins[i][real[i]].numpy().tolist() == expected.astype(int).tolist()
    # An explicit library size (cell subset at inference) changes the normalisation accordingly.
    lib = torch.tensor([1e4, 1e4], dtype=torch.float64)
    assert bin_counts(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]), cfg, library_size=lib[:1]
    ).tolist() == [[1, 0]]


def test_raw_count_edges():
    counts = torch.tensor([[1.0, 9, 10, 99, 100, 5000]])
    real = torch.ones_like(counts, dtype=torch.bool)
    uniform = bin_counts(counts, real, BinningConfig(method="uniform", num_bins=10, max_count=100.0))
    assert uniform.tolist() == [[0, 0, 1, 9, 9, 9]]
    log_uniform = bin_counts(counts, real, BinningConfig(method="log_uniform", num_bins=4, max_count=1e4))
    assert log_uniform.tolist() == [[math.floor(math.log10(c)) for c in [1, 9, 10, 99, 100, 5000]]]
