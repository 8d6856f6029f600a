"""A speed ratio from paired rounds: each round times both sides back to back, so a slow moment of
the machine lands in one round's pair rather than in one side's median."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class PairedRatio(NamedTuple):
    median: float  # median over the rounds of numerator / denominator
    low: float  # bootstrap interval of that median
    high: float
    rounds: int


def paired_ratio(
    numerator: Sequence[float],
    denominator: Sequence[float],
    *,
    confidence: float = 0.9,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedRatio:
    """The median of the per-round ratios and a percentile-bootstrap `confidence` interval of it
    (rounds resampled with replacement; a fixed seed, so a result can be reproduced)."""
    ratios = np.asarray(numerator, np.float64) / np.asarray(denominator, np.float64)
    if ratios.ndim != 1 or ratios.size == 0:
        raise ValueError("paired_ratio needs the same positive number of rounds on both sides")
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, size=(resamples, ratios.size)), axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(medians, [tail, 100 - tail])
    return PairedRatio(float(np.median(ratios)), float(low), float(high), int(ratios.size))
