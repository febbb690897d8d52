"""The paper's metrics as small pure functions over numbers and texts (no model in here)."""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_WORDS = re.compile(r"\w+|[^\w\s]", re.UNICODE)
NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}  # the paper's weights for bigram and trigram entropy


def ngram_entropy(text: str) -> float:
    """Generation entropy of one text: the weighted mean of its bigram and trigram entropies, in bits."""
    words = _WORDS.findall(text.lower())
    values = []
    for n, weight in NGRAM_WEIGHTS.items():
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(weight * entropy)
    return float(np.mean(values))


def mean_ci95(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and 95% confidence half-width (normal approximation) of ``values``; None for no values."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return {"mean": None, "ci95": None}
    half = 1.96 * array.std(ddof=1) / math.sqrt(array.size) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "ci95": float(half)}


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean (0 when any value is 0), the paper's score S over ES, PS and NS."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)
