"""Per-instance volume distributions: histograms, gamma fits, KL divergences.

Chen et al. compare the synapse volumes that two methods find (and the
annotated ones) as histograms with fitted gamma densities. Here:

- `instance_volumes`: the voxel count (times the voxel volume) of every
  instance of a label volume;
- `fit_gamma`: maximum-likelihood gamma fit with the location fixed at 0
  (`scipy.stats.gamma.fit(volumes, floc=0)`): volumes are positive and a
  free location would shift the density off zero;
- `histogram_kl`: KL divergence between two histograms over the same bins
  (`shared_bins`). Each histogram is normalised to probabilities, `epsilon`
  is added to every bin and it is normalised again, so that an empty bin of
  Q under mass of P gives a large but finite divergence (about
  ``p log(p / epsilon)`` for that bin);
- `gamma_kl`: KL divergence between two gamma densities, in closed form;
- `compare_volume_distributions`: all of that for two sets of volumes.

KL(P || Q) is in nats and not symmetric: P is the first argument (e.g. the
ground truth), Q the one that approximates it (a method's output).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import special, stats

from synjax.errors import ConfigError, DataError

DEFAULT_NUM_BINS = 30
DEFAULT_EPSILON = 1e-6


def instance_volumes(labels: np.ndarray, voxel_volume: float = 1.0) -> np.ndarray:
    """Volume of every instance (nonzero id) of `labels`, in increasing id order.

    Args:
        labels: `[z, y, x]` (any shape) integer instance labels, 0 background.
        voxel_volume: volume of one voxel (e.g. nm^3 or um^3; 1.0: voxels).

    Returns:
        `[n]` float64 volumes.

    Raises:
        DataError: if the labels are not integers.
    """
    labels = np.asarray(labels)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise DataError(f"instance_volumes: labels must be integers, got dtype {labels.dtype}")
    _, counts = np.unique(labels[labels != 0], return_counts=True)
    return counts.astype(np.float64) * voxel_volume


class GammaFit(NamedTuple):
    """Gamma density with location 0: ``x^(shape-1) exp(-x/scale) / (Gamma(shape) scale^shape)``."""

    shape: float
    scale: float

    @property
    def mean(self) -> float:
        return self.shape * self.scale

    def pdf(self, x: np.ndarray) -> np.ndarray:
        """Density at `x` (same units as the fitted volumes)."""
        return stats.gamma.pdf(x, self.shape, loc=0.0, scale=self.scale)


def fit_gamma(volumes: np.ndarray) -> GammaFit:
    """Maximum-likelihood gamma fit with the location fixed at 0.

    Args:
        volumes: `[n]` positive values, at least two distinct.

    Returns:
        `GammaFit`.

    Raises:
        DataError: if there are fewer than two distinct values or one is not positive.
    """
    volumes = np.asarray(volumes, np.float64).reshape(-1)
    if volumes.size < 2 or np.unique(volumes).size < 2:
        raise DataError(f"fit_gamma: needs at least two distinct volumes, got {volumes.size}")
    if not (volumes > 0).all():
        raise DataError("fit_gamma: volumes must be positive")
    shape, _, scale = stats.gamma.fit(volumes, floc=0.0)
    return GammaFit(float(shape), float(scale))


def shared_bins(
    *volume_sets: np.ndarray, num_bins: int = DEFAULT_NUM_BINS, log: bool = False
) -> np.ndarray:
    """`[num_bins + 1]` bin edges spanning all the given volumes.

    Args:
        *volume_sets: one or more `[n_i]` arrays of volumes.
        num_bins: number of bins.
        log: log-spaced bins (volumes must be positive) instead of linear ones.
    """
    if num_bins < 1:
        raise ConfigError(f"shared_bins: num_bins must be >= 1, got {num_bins}")
    values = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in volume_sets])
    if values.size == 0:
        raise DataError("shared_bins: no volumes")
    low, high = float(values.min()), float(values.max())
    if high == low:
        high = low + 1.0
    if log:
        if low <= 0:
            raise DataError("shared_bins: log bins need positive volumes")
        return np.geomspace(low, high, num_bins + 1)
    return np.linspace(low, high, num_bins + 1)


def _smoothed(counts: np.ndarray, epsilon: float) -> np.ndarray:
    counts = np.asarray(counts, np.float64).reshape(-1)
    total = counts.sum()
    if total <= 0 or (counts < 0).any():
        raise DataError("histogram_kl: histograms need non-negative counts with a positive sum")
    probabilities = counts / total + epsilon
    return probabilities / probabilities.sum()


def histogram_kl(
    p_counts: np.ndarray, q_counts: np.ndarray, epsilon: float = DEFAULT_EPSILON
) -> float:
    """KL(P || Q) in nats between two histograms over the same bins.

    Args:
        p_counts: `[bins]` counts (or densities) of P.
        q_counts: `[bins]` counts of Q.
        epsilon: added to every bin's probability before renormalising (> 0).
    """
    if epsilon <= 0:
        raise ConfigError(f"histogram_kl: epsilon must be > 0, got {epsilon}")
    if np.shape(p_counts) != np.shape(q_counts):
        raise DataError(f"histogram_kl: bins differ: {np.shape(p_counts)} vs {np.shape(q_counts)}")
    p, q = _smoothed(p_counts, epsilon), _smoothed(q_counts, epsilon)
    return float(np.sum(p * np.log(p / q)))


def gamma_kl(p: GammaFit, q: GammaFit) -> float:
    """KL(P || Q) in nats between two gamma densities (shape k, scale theta), closed form.

    ``(k_p - k_q) psi(k_p) - ln Gamma(k_p) + ln Gamma(k_q)
    + k_q (ln theta_q - ln theta_p) + k_p (theta_p - theta_q) / theta_q``.
    """
    return float(
        (p.shape - q.shape) * special.digamma(p.shape)
        - special.gammaln(p.shape)
        + special.gammaln(q.shape)
        + q.shape * (np.log(q.scale) - np.log(p.scale))
        + p.shape * (p.scale - q.scale) / q.scale
    )


class DistributionComparison(NamedTuple):
    """Two volume distributions side by side.

    Attributes:
      edges: `[bins + 1]` shared bin edges.
      counts_p, counts_q: `[bins]` histograms of P and Q.
      fit_p, fit_q: their gamma fits.
      histogram_kl: KL(P || Q) of the histograms (smoothed), nats.
      gamma_kl: KL(P || Q) of the gamma fits, nats.
    """

    edges: np.ndarray
    counts_p: np.ndarray
    counts_q: np.ndarray
    fit_p: GammaFit
    fit_q: GammaFit
    histogram_kl: float
    gamma_kl: float


def compare_volume_distributions(
    volumes_p: np.ndarray,
    volumes_q: np.ndarray,
    num_bins: int = DEFAULT_NUM_BINS,
    log_bins: bool = False,
    epsilon: float = DEFAULT_EPSILON,
) -> DistributionComparison:
    """Histograms on shared bins, gamma fits and both KL(P || Q) of two sets of volumes.

    Args:
        volumes_p: `[n]` volumes of P (e.g. the annotated instances).
        volumes_q: `[m]` volumes of Q (e.g. a method's instances).
        num_bins, log_bins: bins, see `shared_bins`.
        epsilon: histogram smoothing, see `histogram_kl`.
    """
    edges = shared_bins(volumes_p, volumes_q, num_bins=num_bins, log=log_bins)
    counts_p, _ = np.histogram(volumes_p, edges)
    counts_q, _ = np.histogram(volumes_q, edges)
    fit_p, fit_q = fit_gamma(volumes_p), fit_gamma(volumes_q)
    return DistributionComparison(
        edges,
        counts_p,
        counts_q,
        fit_p,
        fit_q,
        histogram_kl(counts_p, counts_q, epsilon),
        gamma_kl(fit_p, fit_q),
    )
