"""Fact sets in the record format of ROME's ``known_1000.json``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .assets import ASSETS
from .errors import InputError

DEFAULT_FACTS = ASSETS / "known_facts.json"
REQUIRED_KEYS = ("subject", "attribute", "template", "prompt")


@dataclass(frozen=True)
class Fact:
    """One known fact: ``prompt`` is ``template`` with the subject filled in; ``attribute`` is the true answer."""

    known_id: int
    subject: str
    attribute: str
    template: str
    prediction: str
    prompt: str
    relation_id: str

    def to_json(self) -> dict:
        """The record as in ``known_1000.json``."""
        return asdict(self)


def parse_facts(records: object, source: str = "fact set") -> list[Fact]:
    """Facts from a decoded JSON list, or :class:`InputError` naming the first bad record."""
    if not isinstance(records, list) or not records:
        raise InputError(f"{source}: expected a non-empty JSON list of records like ROME's known_1000.json")
    facts = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{source}: record {index} is not an object")
        missing = [key for key in REQUIRED_KEYS if not isinstance(record.get(key), str) or not record.get(key)]
        if missing:
            raise InputError(
                f"{source}: record {index} lacks {', '.join(missing)}; expected known_1000.json records "
                "(known_id, subject, attribute, template, prediction, prompt, relation_id)"
            )
        if record["subject"] not in record["prompt"]:
            raise InputError(f"{source}: record {index}: subject {record['subject']!r} does not occur in its prompt")
        facts.append(
            Fact(
                known_id=int(record.get("known_id", index)),
                subject=record["subject"],
                attribute=record["attribute"],
                template=record["template"],
                prediction=str(record.get("prediction", "")),
                prompt=record["prompt"],
                relation_id=str(record.get("relation_id", "")),
            )
        )
    return facts


def load_facts(path: str | Path | None = None, limit: int | None = None) -> list[Fact]:
    """Read a ``known_1000.json``-style file (the bundled fact set by default)."""
    path = Path(path) if path is not None else DEFAULT_FACTS
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"fact set {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"fact set {str(path)!r} is not valid UTF-8 JSON: {error}") from None
    facts = parse_facts(records, source=str(path))
    return facts if limit is None else facts[: max(0, limit)]
