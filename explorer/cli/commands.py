"""The commands: each reads its arguments, runs an engine with a progress bar, and prints or writes the result."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import InputError
from ..tracing.export import json_text
from .arguments import chosen_method, edit_options, trace_options
from .console import ProgressBar, load, write_json


def run_trace(args: argparse.Namespace) -> int:
    """The ``trace`` command."""
    from ..app import plots
    from ..core.prompts import clean_text
    from ..tracing import export, trace
    from ..tracing.attribution import estimate_trace

    options = trace_options(args)
    clean_text(args.prompt, "prompt")
    handle = load(args)
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
        write_json(args.json_out, export.trace_to_json(result))
    if args.html_out:
        Path(args.html_out).write_text(plots.trace_html(result), encoding="utf-8")
    if args.npz_out:
        export.write_npz(result, args.npz_out)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """The ``inspect`` command: one cell's logit-lens read-outs and the answer with and without its restoration."""
    from ..core.prompts import clean_text
    from ..tracing.inspection import inspect_cell, parse_cell

    options = trace_options(args)
    clean_text(args.prompt, "prompt")
    kind, token, layer = parse_cell(args.cell)
    handle = load(args)
    found = inspect_cell(handle, args.prompt, args.subject, kind, token, layer, options)
    print(f"{kind} cell at token {token} ({found.token_text!r}), layer {layer} (restores layers "
          f"{found.restored_layers[0]}-{found.restored_layers[-1]}); answer {found.answer!r}: p = {found.answer_clean:.4f} clean, "
          f"{found.answer_corrupted:.4f} corrupted, {found.answer_restored:.4f} with this cell restored", file=sys.stderr)
    for label, predictions in (("logit lens, clean", found.lens_clean), ("logit lens, corrupted", found.lens_corrupted),
                               ("logit lens, restored", found.lens_restored), ("output, restored", found.output_restored)):
        print(f"  {label:<22}" + ", ".join(f"{text!r} {p:.3f}" for text, p in predictions), file=sys.stderr)
    write_json(args.json_out, found.to_json())
    return 0


def run_average(args: argparse.Namespace) -> int:
    """The ``average`` command."""
    from ..core.facts import load_facts
    from ..tracing.aggregate import average_effects

    facts = load_facts(args.facts, args.limit)
    options = trace_options(args)
    handle = load(args)
    bar = ProgressBar("averaging")
    try:
        result = average_effects(handle, facts, options, progress=bar)
    finally:
        bar.done()
    print(f"{result.facts_correct} of {result.facts_total} facts predicted correctly", file=sys.stderr)
    write_json(args.json_out, result.to_json())
    return 0


def run_severed(args: argparse.Namespace) -> int:
    """The ``severed`` command."""
    from ..core.facts import load_facts
    from ..tracing.aggregate import average_severed, known_prompts

    options = trace_options(args)
    handle = load(args)
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
    write_json(args.json_out, result)
    return 0


def run_known(args: argparse.Namespace) -> int:
    """The ``known`` command: correct completions per relation."""
    from dataclasses import replace

    from ..core.facts import load_facts
    from ..core.scoring import answer_starts_with, top_prediction

    facts = load_facts(args.facts)
    handle = load(args)
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
    write_json(args.json_out, {"facts_total": len(facts), "facts_correct": correct,
                                "relations": {r: {"correct": c, "total": t} for r, (c, t) in sorted(per_relation.items())}})
    return 0


def run_edit(args: argparse.Namespace) -> int:
    """The ``edit`` command: compute an edit, compare before and after, optionally save it."""
    from dataclasses import asdict

    from ..core.generation import GREEDY, Sampling
    from ..core.progress import part_of
    from ..editing import edit_fact, make_request, plan_edit
    from ..editing.edits import EditSession, load_edit
    from ..studies.compare import DECODED_METRICS, Probes, compare, with_true_target

    request = make_request(args.prompt, args.subject, args.target_new, args.target_true)
    options = edit_options(args)
    saved = [load_edit(path) for path in args.apply_edit]
    if not 1 <= args.tokens <= 200:
        raise InputError("--tokens must be between 1 and 200")
    handle = load(args)
    session = EditSession(handle)
    for edit in saved:
        session.add(edit)
    bar = ProgressBar("editing")
    try:
        plan = plan_edit(handle, options, part_of(bar, 0, 0.2))  # validates against the model before any pass
        request = with_true_target(handle, request, session)
        edit = edit_fact(session, request, plan, progress=bar)
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
        "settings": options.settings,
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
    for name in DECODED_METRICS:
        if before["decoded"][name] is not None:
            print(f"{name}: {before['decoded'][name]:.2f} -> {after['decoded'][name]:.2f}", file=sys.stderr)
    for old, new in zip(before["generations"], after["generations"]):
        print(f"{old['prompt']}\n  original: {old['text']!r}\n  edited:   {new['text']!r}", file=sys.stderr)
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    write_json(args.json_out, data)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """The ``evaluate`` command: paper-style table on stderr, JSON to --json (or stdout)."""
    from ..studies.evaluate import EvaluationSettings, evaluate, format_table, read_dataset

    kind, cases = read_dataset(args.dataset, args.limit, zsre_target=args.zsre_target)
    options = edit_options(args)
    method = chosen_method(args, options)
    handle = load(args)
    settings = EvaluationSettings(method=method, generation=not args.skip_generation, edit=options,
                                  decoded=not args.skip_decoded, zsre_target=args.zsre_target)
    partial = Path(args.json_out + ".partial.jsonl") if args.json_out else None
    bar = ProgressBar(f"evaluating {method} ({options.settings} settings)")
    try:
        result = evaluate(handle, cases, kind, settings, partial, progress=bar)
    finally:
        bar.done()
    print(format_table(result), file=sys.stderr)
    write_json(args.json_out, result)
    if partial is not None and partial.exists():
        partial.unlink()  # the run finished: the JSON has every case
    return 0


def run_sequential(args: argparse.Namespace) -> int:
    """The ``sequential`` command: a data set's edits one after another, checkpoints on stderr, JSON to --json."""
    from ..studies.evaluate import read_dataset
    from ..studies.sequential import SequentialSettings, sequential_run

    kind, cases = read_dataset(args.dataset, args.limit, zsre_target=args.zsre_target)
    options = edit_options(args)
    settings = SequentialSettings(method=chosen_method(args, options), every=args.every, edit=options, probes=args.probes)
    settings.validate(len(cases))
    handle = load(args)
    bar = ProgressBar(f"sequential {settings.method}")

    def show(point: dict) -> None:
        scores = ", ".join(f"{key} {point[key]:.1f}" for key in ("ES", "PS", "NS") if point[key] is not None)
        bar.done()
        retained = "no probe facts" if point["probe_retained"] is None else f"probe facts {100 * point['probe_retained']:.0f}% right"
        print(f"after {point['edits']} edits: {scores or 'no edits yet'}; {retained}, fluency {point['fluency']:.2f}, |dW|/|W| {point['relative_norm']:.3g}, {point['seconds']:.0f} s", file=sys.stderr)
        for warning in point["warnings"]:
            print(f"  warning: {warning}", file=sys.stderr)

    try:
        result = sequential_run(handle, cases, kind, settings, progress=bar, on_checkpoint=show)
    finally:
        bar.done()
    write_json(args.json_out, {**result, "zsre_target": args.zsre_target if kind == "zsre" else None})
    return 0


def sweep_request(args: argparse.Namespace):
    """The sweep's request and probes: from ``--case`` (the bundled hand-written cases) or the typed fields."""
    from ..editing import make_request
    from ..studies.compare import Probes
    from ..studies.evaluate import HANDWRITTEN_CASES, read_dataset

    if args.case is not None:
        if args.prompt or args.subject or args.target_new:
            raise InputError("give either --case or --prompt/--subject/--target, not both")
        cases = {case.case_id: case for case in read_dataset(HANDWRITTEN_CASES)[1]}
        if args.case not in cases:
            raise InputError(f"no case {args.case!r} in the bundled hand-written cases; its ids are {min(cases, key=int)} to {max(cases, key=int)}")
        case = cases[args.case]
        return case.request, Probes(case.paraphrases + tuple(args.paraphrase), case.neighborhood + tuple(args.neighborhood))
    if not (args.prompt and args.subject and args.target_new):
        raise InputError("give --prompt, --subject and --target (or --case ID of the bundled hand-written cases)")
    request = make_request(args.prompt, args.subject, args.target_new, args.target_true)
    return request, Probes(tuple(args.paraphrase), tuple(args.neighborhood))


def run_sweep(args: argparse.Namespace) -> int:
    """The ``sweep`` command: one edit at each layer, each point on stderr as it comes, JSON to --json."""
    from ..editing.edits import EditSession
    from ..studies.sweep import parse_layers, sweep_layers
    from ..tracing import TraceOptions, validate_options

    request, probes = sweep_request(args)
    options = edit_options(args)
    trace_settings = TraceOptions(kinds=("mlp",), samples=args.samples)
    validate_options(trace_settings)
    handle = load(args)
    layers = parse_layers(args.layers, handle.num_layers)
    bar = ProgressBar("sweeping")

    def show(point: dict) -> None:
        bar.done()
        if "mlp_effect" in point:
            print("MLP effect at the last subject token: " + " ".join(f"{v:.3f}" for v in point["mlp_effect"]), file=sys.stderr)
            return
        print(f"layer {point['layer']}: P(new) {point['new_prob']:.4f}, P(true) {point['true_prob']:.4f}, ES {point['ES']:.0f}, "
              f"PS {point['PS'] if point['PS'] is None else format(point['PS'], '.2f')}, "
              f"NS {point['NS'] if point['NS'] is None else format(point['NS'], '.2f')}, |dW| {point['delta_norm']:.3g}, "
              f"{point['seconds']:.1f} s", file=sys.stderr)

    try:
        result = sweep_layers(EditSession(handle), request, probes, layers, options, bar, show, trace_settings)
    finally:
        bar.done()
    print(f"traced peak: layer {result['peak_layer']}; best edit: layer {result['best_layer']}", file=sys.stderr)
    write_json(args.json_out, result)
    return 0
