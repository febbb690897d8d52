"""Trace results as JSON, CSV and ROME's npz layout: the one format the CLI, the app and the tests share."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from . import TraceResult


def trace_to_json(result: TraceResult) -> dict:
    """The documented JSON keys (``model`` … ``traces``), plus a few extras that never rename them."""
    return {
        "model": result.model,
        "prompt": result.prompt,
        "subject": result.subject,
        "tokens": list(result.tokens),
        "subject_range": [int(result.subject_range[0]), int(result.subject_range[1])],
        "answer": result.answer,
        "high_score": float(result.high_score),
        "low_score": float(result.low_score),
        "noise_std": float(result.noise_std),
        "samples": int(result.samples),
        "window": int(result.window),
        "seed": int(result.seed),
        "seconds": float(result.seconds),
        "traces": {kind: np.asarray(grid, dtype=float).tolist() for kind, grid in result.scores.items()},
        # extras
        "noise": float(result.noise),
        "answer_id": int(result.answer_id),
        "subject_guessed": bool(result.subject_guessed),
        "num_layers": int(result.num_layers),
        "method": result.method,
    }


def trace_from_json(data: dict) -> TraceResult:
    """Rebuild a :class:`TraceResult` from :func:`trace_to_json`'s output."""
    return TraceResult(
        model=data["model"],
        prompt=data["prompt"],
        subject=data["subject"],
        subject_guessed=bool(data.get("subject_guessed", False)),
        tokens=list(data["tokens"]),
        subject_range=(int(data["subject_range"][0]), int(data["subject_range"][1])),
        answer=data["answer"],
        answer_id=int(data.get("answer_id", -1)),
        high_score=float(data["high_score"]),
        low_score=float(data["low_score"]),
        scores={kind: np.asarray(grid, dtype=float) for kind, grid in data["traces"].items()},
        noise=float(data.get("noise", 0.0)),
        noise_std=float(data["noise_std"]),
        samples=int(data["samples"]),
        window=int(data["window"]),
        seed=int(data["seed"]),
        seconds=float(data["seconds"]),
        num_layers=int(data.get("num_layers", len(next(iter(data["traces"].values()))[0]))),
        method=str(data.get("method", "exact")),
    )


def json_text(data: object) -> str:
    """The project's JSON layout: indented, non-ASCII kept as is."""
    return json.dumps(data, indent=1, ensure_ascii=False)


def write_data(data: object, path: str | Path) -> Path:
    """Write ``data`` as JSON to ``path``."""
    path = Path(path)
    path.write_text(json_text(data), encoding="utf-8")
    return path


def write_json(result: TraceResult, path: str | Path) -> Path:
    """Write the trace's JSON to ``path``."""
    return write_data(trace_to_json(result), path)


def trace_to_csv(result: TraceResult) -> str:
    """One row per (kind, token, layer): probability and indirect effect."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["kind", "token_index", "token", "is_subject", "layer", "probability", "indirect_effect"])
    start, end = result.subject_range
    for kind, grid in result.scores.items():
        for t, token in enumerate(result.tokens):
            for layer in range(grid.shape[1]):
                p = float(grid[t, layer])
                writer.writerow([kind, t, token, int(start <= t < end), layer, f"{p:.8g}", f"{p - result.low_score:.8g}"])
    return buffer.getvalue()


def npz_paths(path: str | Path, kinds: list[str]) -> dict[str, Path]:
    """Where each kind's npz goes: ``path`` itself for one kind, ``stem_<kind>.npz`` beside it for several."""
    path = Path(path)
    if len(kinds) == 1:
        return {kinds[0]: path}
    return {kind: path.with_name(f"{path.stem}_{kind}{path.suffix or '.npz'}") for kind in kinds}


def write_npz(result: TraceResult, path: str | Path) -> list[Path]:
    """ROME's npz layout (scores, low_score, high_score, input_tokens, subject_range, answer, window, kind), one file per kind."""
    written = []
    for kind, target in npz_paths(path, list(result.scores)).items():
        np.savez(
            target,
            scores=np.asarray(result.scores[kind]),
            low_score=np.asarray(result.low_score),
            high_score=np.asarray(result.high_score),
            input_tokens=np.asarray(result.tokens),
            subject_range=np.asarray(result.subject_range),
            answer=np.asarray(result.answer),
            window=np.asarray(result.window),
            kind=np.asarray("" if kind == "hidden" else kind),
        )
        written.append(target)
    return written
