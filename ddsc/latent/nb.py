"""Negative-binomial (and zero-inflated NB) log-likelihood of raw UMI counts, scVI's parameterisation.

``NB(x; mu, theta)`` has mean ``mu`` and inverse dispersion ``theta`` (variance ``mu + mu^2 / theta``); it is
``scipy.stats.nbinom(n=theta, p=theta / (theta + mu))``. The zero-inflated version mixes in a point mass at 0
with probability ``pi = sigmoid(zi_logits)``.

Why these forms: UMI counts are overdispersed (a Poisson is too narrow) and mostly small, and a likelihood on
the counts themselves (rather than on bins or log1p values) is what makes a decoder's output a calibrated
distribution over counts. Everything runs in log space, in float32 with autocast off whatever the caller's
precision (bf16 lgamma of counts in the thousands would be off by whole nats): ``log(theta + mu)`` is a
``logaddexp`` of the two logs, ``log pi`` and ``log(1 - pi)`` are ``-softplus(-l)`` and ``-softplus(l)``, and the
zero case of the mixture is a ``logaddexp`` too, so nothing overflows or takes ``log(0)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def nb_log_prob_log_space(x: Tensor, log_mu: Tensor, log_theta: Tensor, zi_logits: Tensor | None = None) -> Tensor:
    """Elementwise ``log p(x)`` float32 from ``log mu``, ``log theta`` and optional zero-inflation logits.

    The decoder works with these logs directly (its outputs are log-rates), so ``mu = 0`` never appears.
    Shapes broadcast; ``x`` holds non-negative counts (float or integer).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, log_mu, log_theta = x.float(), log_mu.float(), log_theta.float()
        theta = log_theta.exp()
        log_theta_mu = torch.logaddexp(log_theta, log_mu)  # log(theta + mu)
        log_nb0 = theta * (log_theta - log_theta_mu)  # log NB(0)
        log_nb = (
            torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1) + log_nb0 + x * (log_mu - log_theta_mu)
        )
        if zi_logits is None:
            return log_nb
        logits = zi_logits.float()
        log_pi, log_not_pi = -F.softplus(-logits), -F.softplus(logits)
        zero = torch.logaddexp(log_pi, log_not_pi + log_nb0)  # log(pi + (1 - pi) NB(0))
        return torch.where(x > 0, log_not_pi + log_nb, zero)


def nb_log_prob(x: Tensor, mu: Tensor, theta: Tensor, zi_logits: Tensor | None = None) -> Tensor:
    """``log p(x)`` from the mean ``mu > 0`` and inverse dispersion ``theta > 0`` (see the module docstring)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return nb_log_prob_log_space(x, mu.float().log(), theta.float().log(), zi_logits)


def sample_nb(
    mu: np.ndarray, theta: np.ndarray, pi: np.ndarray | None, rng: np.random.Generator, at_least_one: bool = False
) -> np.ndarray:
    """Counts float32 from NB(mu, theta), zero with probability ``pi``; ``at_least_one`` draws from the NB given
    ``count >= 1`` instead (by inverse CDF above the zero mass; ``pi`` is then irrelevant), as for the genes of a
    panel known to be expressed."""
    if not at_least_one:
        counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)
        if pi is not None:
            counts[rng.random(counts.shape) < pi] = 0.0
        return counts
    from scipy import stats

    p = theta / (theta + mu)
    zero = np.exp(theta * np.log(p))
    u = zero + (1 - zero) * rng.random(np.shape(mu))
    return np.maximum(stats.nbinom.ppf(np.minimum(u, 1 - 1e-12), theta, p), 1).astype(np.float32)
