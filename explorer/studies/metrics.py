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


def rome_ngram_entropy(text: str) -> float:
    """The paper's generation entropy of one text, computed as ROME's ``compute_n_gram_entropy`` does.

    NLTK's word tokens (case kept, punctuation as tokens), the bigram and trigram entropies in bits
    weighted 2/3 and 4/3, their mean. ROME's ``word_tokenize`` splits sentences with Punkt's trained
    English model, a data file nothing here may download; the untrained Punkt splitter stands in for it
    (it differs only at abbreviations such as "Mr."). Reports multiply the mean over texts by 100, the
    paper's scale (GE 626 for unedited GPT-2 XL).
    """
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    words_of = NLTKWordTokenizer().tokenize
    words = [word for sentence in PunktSentenceTokenizer().tokenize(text) for word in words_of(sentence)]
    values = []
    for n, weight in NGRAM_WEIGHTS.items():
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        frequencies = np.array([count / total for count in grams.values()]) if total else np.zeros(0)
        values.append(weight * float(np.sum(-frequencies * np.log2(frequencies))) if total else 0.0)
    return float(np.mean(values))


def rome_generation_text(prompt_and_continuation: str) -> str:
    """A generated text as ROME's ``generate_fast`` hands it to the entropy: NFKD, blank lines as spaces."""
    import unicodedata

    return unicodedata.normalize("NFKD", prompt_and_continuation).replace("\n\n", " ")


def begins_with(continuation: str, target: str) -> bool:
    """Whether a decoded continuation begins with ``target`` as a whole word (leading spaces aside).

    " Paris, France" begins with " Paris"; " Parisian" does not, nor does " the city of Paris".
    """
    text, wanted = continuation.lstrip(), target.strip()
    if not wanted or not text.startswith(wanted):
        return False
    rest = text[len(wanted):]
    return not rest or not (rest[0].isalnum() or rest[0] == "_")


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
