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


ProbabilityPairs = Sequence[tuple[float, float]]  # (P(target_new), P(target_true)) per prompt


def rewrite_scores(rewrite: ProbabilityPairs, paraphrase: ProbabilityPairs, neighborhood: ProbabilityPairs) -> dict:
    """ES/EM on the edit prompt, PS/PM on paraphrases, NS/NM on neighbours (None where no prompts).

    Scores are shares of prompts where the wanted target is ahead (target_new for the edit prompt and
    paraphrases, target_true for neighbours); magnitudes are mean probability differences.
    """
    out: dict[str, float | None] = {}
    for pairs, score, magnitude, sign in ((rewrite, "ES", "EM", 1), (paraphrase, "PS", "PM", 1), (neighborhood, "NS", "NM", -1)):
        if not pairs:
            out[score] = out[magnitude] = None
            continue
        out[score] = float(np.mean([(new > true) if sign > 0 else (true > new) for new, true in pairs]))
        out[magnitude] = float(np.mean([sign * (new - true) for new, true in pairs]))
    return out
