"""Command line: ``python -m explorer trace|average|severed|known|edit|evaluate ...`` (the same engines as the app)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .export import json_text
from .prompts import InputError

PROGRESS_WIDTH = 30
REPEATABLE = "repeatable: each flag adds to the list, e.g. --{name} A B --{name} C gives A, B, C"


class ProgressBar:
    """A one-line progress bar with an estimate of the time left, on stderr."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.began = time.monotonic()

    def __call__(self, fraction: float, message: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        elapsed = time.monotonic() - self.began
        left = f", ~{elapsed / fraction - elapsed:.0f}s left" if fraction > 0.02 else ""
        filled = int(PROGRESS_WIDTH * fraction)
        bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {fraction:4.0%} {elapsed:.0f}s{left} {message[:40]:<40}")
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default' (embedded Gemma 3 270M), a hub name or a local folder")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")


def _add_trace_options(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    parser.add_argument("--kinds", action="extend", type=_kinds, metavar="KINDS",
                        help="comma-separated, from hidden,mlp,attn (the default: all three); repeatable, "
                             "each --kinds adds to the list")
    from .tracing import TraceOptions  # the defaults are the dataclass's: one source for the CLI, app and API

    defaults = TraceOptions()
    parser.add_argument("--samples", default=defaults.samples, type=int, help=f"corrupted runs per cell (default {defaults.samples})")
    parser.add_argument("--window", default=defaults.window, type=int,
                        help=f"layers restored together for mlp/attn (default {defaults.window})")
    parser.add_argument("--noise", default=defaults.noise, type=float,
                        help=f"noise std as a multiple of the subject-embedding std (default {defaults.noise:g})")
    parser.add_argument("--seed", default=defaults.seed, type=int, help=f"seed of the noise draws (default {defaults.seed})")
    parser.add_argument("--json", dest="json_out", help="write the result as JSON here")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m explorer", description="Locate and edit factual associations (ROME).")
    commands = parser.add_subparsers(dest="command", required=True)

    trace = commands.add_parser("trace", help="causal trace of one prompt")
    trace.add_argument("prompt")
    trace.add_argument("--subject", help="the subject as written in the prompt (guessed when left out)")
    trace.add_argument("--target", help="answer to measure (default: the clean run's top-1 token)")
    _add_trace_options(trace)
    trace.add_argument("--html", dest="html_out", help="write interactive heatmaps here")
    trace.add_argument("--npz", dest="npz_out", help="write ROME's npz layout here (one file per kind: NAME_<kind>.npz)")
    trace.add_argument("--method", default="exact", choices=("exact", "atp"),
                       help="exact (every cell restored, default) or atp (estimated from gradients in seconds)")

    inspect = commands.add_parser("inspect", help="a look inside one cell of a trace: logit lens and its restoration")
    inspect.add_argument("prompt")
    inspect.add_argument("--cell", required=True, help="KIND,TOKEN,LAYER as in the trace's heatmaps, e.g. mlp,4,6")
    inspect.add_argument("--subject", help="the subject as written in the prompt (guessed when left out)")
    inspect.add_argument("--target", help="answer to measure (default: the clean run's top-1 token)")
    _add_trace_options(inspect)

    average = commands.add_parser("average", help="average effects over a known_1000.json-style fact set")
    average.add_argument("facts", help="fact set JSON (ROME's known_1000.json format)")
    average.add_argument("--limit", type=int, help="use the first N facts")
    _add_trace_options(average)

    severed = commands.add_parser("severed", help="severed-path analysis over facts or prompts")
    severed.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="fact set JSON file(s) or prompts (subject guessed), side by side: "
                              "an input split from the others by an option is an error, never dropped")
    severed.add_argument("--subject", help="subject, for a single prompt")
    severed.add_argument("--limit", type=int, help="use the first N facts")
    _add_trace_options(severed)
    known = commands.add_parser("known", help="how many facts of a fact set the model completes correctly")
    known.add_argument("facts", help="fact set JSON (ROME's known_1000.json format)")
    _add_model_options(known)
    known.add_argument("--write-predictions", dest="write_out", help="write the fact set here with each 'prediction' set to the model's top-1 token")
    known.add_argument("--json", dest="json_out", help="write the counts as JSON here")

    edit = commands.add_parser("edit", help="rewrite one fact with ROME (or the FT baseline) and compare before/after")
    edit.add_argument("--prompt", required=True, help="template with {} for the subject, e.g. '{} is located in the city of'")
    edit.add_argument("--subject", required=True, help="the subject, e.g. 'The Eiffel Tower'")
    edit.add_argument("--target", required=True, dest="target_new", help="the new object, e.g. ' Rome' (mind the leading space)")
    edit.add_argument("--target-true", dest="target_true", help="the current object (default: the model's top-1 token)")
    _add_edit_options(edit)
    # action="extend": a repeated flag adds to the list instead of replacing it. argparse copies the default
    # list before extending it, so the [] below is never shared between parses.
    edit.add_argument("--generate", nargs="+", action="extend", default=[], metavar="PROMPT",
                      help="prompts to complete before and after; " + REPEATABLE.format(name="generate"))
    edit.add_argument("--paraphrase", nargs="+", action="extend", default=[], metavar="PROMPT",
                      help="paraphrases of the edit prompt to score; " + REPEATABLE.format(name="paraphrase"))
    edit.add_argument("--neighborhood", nargs="+", action="extend", default=[], metavar="PROMPT",
                      help="prompts whose answer must stay target_true; " + REPEATABLE.format(name="neighborhood"))
    edit.add_argument("--sample-seed", type=int, help="sample generations (top-k 50) with this seed instead of greedy")
    from .compare import GENERATION_TOKENS

    edit.add_argument("--tokens", type=int, default=GENERATION_TOKENS, help=f"tokens per generation (default {GENERATION_TOKENS})")
    edit.add_argument("--apply-edit", nargs="+", action="extend", default=[], metavar="FILE",
                      help="saved edits to apply first (stacked); " + REPEATABLE.format(name="apply-edit"))
    edit.add_argument("--save-edit", dest="save_out", help="save the computed edit here (.npz) to re-apply later")
    edit.add_argument("--json", dest="json_out", help="write the report as JSON here")
    _add_model_options(edit)

    evaluate = commands.add_parser("evaluate", help="CounterFact / zsRE metrics of an editing method over a data set")
    evaluate.add_argument("dataset", help="data set JSON: CounterFact (ROME or EasyEdit format) or zsRE (ROME format)")
    evaluate.add_argument("--limit", type=int, help="use the first N cases")
    evaluate.add_argument("--skip-generation", action="store_true", help="skip the fluency (generation entropy) metric")
    _add_edit_options(evaluate)
    evaluate.add_argument("--json", dest="json_out", help="write the result here; per-case lines go to JSON.partial.jsonl as they finish, and a rerun resumes from them")
    _add_model_options(evaluate)
    return parser


def _add_edit_options(parser: argparse.ArgumentParser) -> None:
    from .editing import EditOptions  # the defaults are the dataclass's: one source for the CLI, app and API
    from .stats import CORPORA, StatsSpec

    defaults = EditOptions()
    parser.add_argument("--method", default=defaults.method,
                        help=f"rome, rome-original, ft (or none, for evaluate); default {defaults.method}")
    parser.add_argument("--layer", type=int, help="layer to edit (default: the model's peak MLP-effect layer)")

    parser.add_argument("--stats-corpus", default=StatsSpec.corpus,
                        help=f"key statistics from: {', '.join(CORPORA)} (default {StatsSpec.corpus}: offline Wikipedia text)")
    parser.add_argument("--stats-tokens", type=int, default=StatsSpec.tokens, help=f"tokens of statistics text (default {StatsSpec.tokens})")
    parser.add_argument("--shrinkage", type=float, default=defaults.shrinkage,
                        help=f"ridge on the key statistics, share of mean diagonal (default {defaults.shrinkage:g})")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"at most this many value-optimisation steps (default {defaults.steps})")
    parser.add_argument("--clamp-factor", type=float, help="‖δ‖ ≤ this × ‖MLP output‖ (default: the model's measured value, else 4)")
    parser.add_argument("--loss-stop", type=float, help="stop the value optimisation below this loss (default: measured, else 0.05)")


def _edit_options(args: argparse.Namespace):
    """Edit options from the command line (checked against the model once it is loaded)."""
    from .editing import EditOptions, METHODS
    from .stats import StatsSpec

    if args.method not in (*METHODS, "none") or (args.method == "none" and args.command != "evaluate"):
        raise InputError(f"unknown method {args.method!r}: use one of {', '.join(METHODS)}")
    stats = StatsSpec(corpus=args.stats_corpus, tokens=args.stats_tokens)
    stats.validate()
    method = "rome" if args.method == "none" else args.method
    return EditOptions(
        method=method, layer=args.layer, stats=stats, shrinkage=args.shrinkage, steps=args.steps,
        clamp_factor=args.clamp_factor, loss_stop=args.loss_stop,
    )


def _options(args: argparse.Namespace):
    """The trace options, checked before the model loads: a typo costs no wait."""
    from .tracing import TraceOptions, validate_options

    # --kinds (action extend) is None when never given, else every kind typed; duplicates collapse, in order.
    kinds = tuple(dict.fromkeys(args.kinds)) if args.kinds is not None else TraceOptions.kinds
    options = TraceOptions(
        kinds=kinds, samples=args.samples, window=args.window, noise=args.noise, seed=args.seed, target=getattr(args, "target", None)
    )
    validate_options(options)
    return options


def _load(args: argparse.Namespace):
    from .models import load_model

    bar = ProgressBar("loading model")
    try:
        return load_model(args.model, dtype=args.dtype, device=args.device, progress=bar)
    finally:
        bar.done()


def _write_json(path: str | None, data: dict) -> None:
    text = json_text(data)
    if path:
        Path(path).write_text(text, encoding="utf-8")
    else:
        print(text)


def run_trace(args: argparse.Namespace) -> int:
    """The ``trace`` command."""
    from . import export, plots
    from .prompts import clean_text
    from .attribution import estimate_trace
    from .tracing import trace

    options = _options(args)
    clean_text(args.prompt, "prompt")
    handle = _load(args)
    bar = ProgressBar("tracing" if args.method == "exact" else "estimating")
    engine = trace if args.method == "exact" else estimate_trace
    try:
        result = engine(handle, args.prompt, args.subject, options, progress=bar)
    finally:
        bar.done()
    if result.subject_guessed:
        print(f"subject (guessed): {result.subject}", file=sys.stderr)
    print(plots.caption(result) + f"; {result.seconds:.1f} s", file=sys.stderr)
    if args.json_out or not (args.html_out or args.npz_out):
        _write_json(args.json_out, export.trace_to_json(result))
    if args.html_out:
        Path(args.html_out).write_text(plots.trace_html(result), encoding="utf-8")
    if args.npz_out:
        export.write_npz(result, args.npz_out)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """The ``inspect`` command: one cell's logit-lens read-outs and the answer with and without its restoration."""
    from .inspection import inspect_cell, parse_cell
    from .prompts import clean_text

    options = _options(args)
    clean_text(args.prompt, "prompt")
    kind, token, layer = parse_cell(args.cell)
    handle = _load(args)
    found = inspect_cell(handle, args.prompt, args.subject, kind, token, layer, options)
    print(f"{kind} cell at token {token} ({found.token_text!r}), layer {layer} (restores layers "
          f"{found.restored_layers[0]}-{found.restored_layers[-1]}); answer {found.answer!r}: p = {found.answer_clean:.4f} clean, "
          f"{found.answer_corrupted:.4f} corrupted, {found.answer_restored:.4f} with this cell restored", file=sys.stderr)
    for label, predictions in (("logit lens, clean", found.lens_clean), ("logit lens, corrupted", found.lens_corrupted),
                               ("logit lens, restored", found.lens_restored), ("output, restored", found.output_restored)):
        print(f"  {label:<22}" + ", ".join(f"{text!r} {p:.3f}" for text, p in predictions), file=sys.stderr)
    _write_json(args.json_out, found.to_json())
    return 0


def run_average(args: argparse.Namespace) -> int:
    """The ``average`` command."""
    from .aggregate import average_effects
    from .facts import load_facts

    facts = load_facts(args.facts, args.limit)
    options = _options(args)
    handle = _load(args)
    bar = ProgressBar("averaging")
    try:
        result = average_effects(handle, facts, options, progress=bar)
    finally:
        bar.done()
    print(f"{result.facts_correct} of {result.facts_total} facts predicted correctly", file=sys.stderr)
    _write_json(args.json_out, result.to_json())
    return 0


def run_severed(args: argparse.Namespace) -> int:
    """The ``severed`` command."""
    from .aggregate import average_severed, known_prompts
    from .facts import load_facts

    options = _options(args)
    handle = _load(args)
    prompts: list[tuple[str, str | None]] = []
    for item in args.inputs:
        if item.endswith(".json") and Path(item).exists():
            prompts.extend(known_prompts(handle, load_facts(item, args.limit)))
        else:
            prompts.append((item, args.subject))
    bar = ProgressBar("severing")
    try:
        result = average_severed(handle, prompts, options, progress=bar)
    finally:
        bar.done()
    _write_json(args.json_out, result)
    return 0


def run_known(args: argparse.Namespace) -> int:
    """The ``known`` command: correct completions per relation."""
    from dataclasses import replace

    from .aggregate import answer_starts_with, top_prediction
    from .facts import load_facts

    facts = load_facts(args.facts)
    handle = _load(args)
    bar = ProgressBar("predicting")
    updated, per_relation = [], {}
    for index, fact in enumerate(facts):
        bar(index / len(facts), fact.subject)
        token = top_prediction(handle, fact.prompt)
        ok = answer_starts_with(handle, fact, token)
        updated.append(replace(fact, prediction=handle.tokenizer.decode([token])))
        counts = per_relation.setdefault(fact.relation_id, [0, 0])
        counts[0] += ok
        counts[1] += 1
    bar.done()
    correct = sum(c for c, _ in per_relation.values())
    print(f"{correct} of {len(facts)} facts completed correctly", file=sys.stderr)
    if args.write_out:
        Path(args.write_out).write_text(json_text([f.to_json() for f in updated]) + "\n", encoding="utf-8")
    _write_json(args.json_out, {"facts_total": len(facts), "facts_correct": correct,
                                "relations": {r: {"correct": c, "total": t} for r, (c, t) in sorted(per_relation.items())}})
    return 0


def run_edit(args: argparse.Namespace) -> int:
    """The ``edit`` command: compute an edit, compare before and after, optionally save it."""
    from dataclasses import asdict

    from .compare import Probes, compare, with_true_target
    from .editing import compute_edit, make_request, validate_options
    from .edits import EditSession, load_edit
    from .generation import GREEDY, Sampling

    request = make_request(args.prompt, args.subject, args.target_new, args.target_true)
    options = _edit_options(args)
    saved = [load_edit(path) for path in args.apply_edit]
    if not 1 <= args.tokens <= 200:
        raise InputError("--tokens must be between 1 and 200")
    handle = _load(args)
    validate_options(handle, options)
    session = EditSession(handle)
    for edit in saved:
        session.add(edit)
    request = with_true_target(handle, request, session)
    bar = ProgressBar("editing")
    try:
        with session.applied():
            edit = compute_edit(handle, request, options, progress=bar)
    finally:
        bar.done()
    sampling = GREEDY if args.sample_seed is None else Sampling(top_k=50, seed=args.sample_seed)
    probes = Probes(tuple(args.paraphrase), tuple(args.neighborhood), tuple(args.generate), args.tokens, sampling)
    report = compare(session, edit, probes)
    if args.save_out:
        edit.save(args.save_out)
    summary = edit.summary()
    data = {
        "request": asdict(request),
        "layer": edit.layer,
        "method": edit.method,
        "seconds": edit.seconds,
        "stats": edit.stats,
        "delta_norm": edit.delta_norm,
        "relative_norm": summary["relative_norm"],
        "phases": edit.phases,
        "edits_applied_first": len(saved),
        **report,
    }
    before, after = report["before"], report["after"]
    print(f"layer {edit.layer}, {edit.method}, {edit.seconds:.1f} s; |dW| = {edit.delta_norm:.3g}", file=sys.stderr)
    print(f"P({request.target_new!r}): {before['target_new_prob']:.4f} -> {after['target_new_prob']:.4f}", file=sys.stderr)
    print(f"P({request.target_true!r}): {before['target_true_prob']:.4f} -> {after['target_true_prob']:.4f}", file=sys.stderr)
    for old, new in zip(before["generations"], after["generations"]):
        print(f"{old['prompt']}\n  original: {old['text']!r}\n  edited:   {new['text']!r}", file=sys.stderr)
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    _write_json(args.json_out, data)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """The ``evaluate`` command: paper-style table on stderr, JSON to --json (or stdout)."""
    from .editing import validate_options
    from .evaluate import EvaluationSettings, evaluate, format_table, read_dataset

    kind, cases = read_dataset(args.dataset, args.limit)
    options = _edit_options(args)
    handle = _load(args)
    validate_options(handle, options)
    settings = EvaluationSettings(method=args.method, generation=not args.skip_generation, edit=options)
    partial = Path(args.json_out + ".partial.jsonl") if args.json_out else None
    bar = ProgressBar(f"evaluating {args.method}")
    try:
        result = evaluate(handle, cases, kind, settings, partial, progress=bar)
    finally:
        bar.done()
    print(format_table(result), file=sys.stderr)
    _write_json(args.json_out, result)
    if partial is not None and partial.exists():
        partial.unlink()  # the run finished: the JSON has every case
    return 0


COMMANDS = {
    "trace": run_trace,
    "inspect": run_inspect,
    "average": run_average,
    "severed": run_severed,
    "known": run_known,
    "edit": run_edit,
    "evaluate": run_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input exits 2 with a one-line message."""
    from .models import ModelLoadError
    from .progress import Cancelled

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (InputError, ModelLoadError, Cancelled, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
