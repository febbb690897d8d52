"""The command line's arguments: one function per command, shared option groups, and reading them into options.

Defaults come from the engines' dataclasses (TraceOptions, EditOptions, StatsSpec): one source for the CLI,
the app and the Python API.
"""
from __future__ import annotations

import argparse

from ..core.errors import InputError
from ..core.prompts import read_json_input

REPEATABLE = "repeatable: each flag adds to the list, e.g. --{name} A B --{name} C gives A, B, C"


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default' (embedded Gemma 3 270M), a hub name or a local folder")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")


def add_trace_options(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--kinds", action="extend", type=_kinds, metavar="KINDS",
                        help="comma-separated, from hidden,mlp,attn (the default: all three); repeatable, "
                             "each --kinds adds to the list")
    from ..tracing import TraceOptions  # the defaults are the dataclass's: one source for the CLI, app and API

    defaults = TraceOptions()
    parser.add_argument("--samples", default=defaults.samples, type=int, help=f"corrupted runs per cell (default {defaults.samples})")
    parser.add_argument("--window", default=defaults.window, type=int,
                        help=f"layers restored together for mlp/attn (default {defaults.window})")
    parser.add_argument("--noise", default=defaults.noise, type=float,
                        help=f"noise std as a multiple of the subject-embedding std (default {defaults.noise:g})")
    parser.add_argument("--seed", default=defaults.seed, type=int, help=f"seed of the noise draws (default {defaults.seed})")
    parser.add_argument("--json", dest="json_out", help="write the result as JSON here")


def add_edit_options(parser: argparse.ArgumentParser, layer: bool = True) -> None:
    from ..editing import (
        SETTINGS,
        EditOptions,  # the defaults are the dataclass's: one source for the CLI, app and API
    )
    from ..editing.corpora import CORPORA, StatsSpec

    defaults = EditOptions()
    parser.add_argument("--method", default=None,
                        help="rome, rome-original, ft (or none, for evaluate); default: rome, or rome-original with "
                             "--settings reference")
    parser.add_argument("--settings", default=defaults.settings, choices=SETTINGS,
                        help="project (default: the measured settings, docs/editing.md) or reference (every choice as "
                             "ROME's reference code makes it)")
    parser.add_argument("--prefixes-file", help="a JSON list of context templates, each with one {} (the first \"{}\"), "
                                                "used instead of generated prefixes")
    parser.add_argument("--stats-file", help="C from this file instead of computed: a layer_N.pt of this project's cache, "
                                             "or an .npz in ROME's layer_stats layout (mom2.mom2, mom2.count)")
    parser.add_argument("--no-strengthen", dest="strengthen", action="store_const", const=False, default=None,
                        help="never scale δ up to make an edit hold on its own prompt (reference settings never do)")
    if layer:
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


def add_zsre_target_option(parser: argparse.ArgumentParser) -> None:
    from ..studies.evaluate import ZSRE_TARGETS

    parser.add_argument("--zsre-target", default=ZSRE_TARGETS[0], choices=ZSRE_TARGETS,
                        help="zsRE records: edit towards answers[0] and ask the neighbour as loc + '?' (answers, ROME's "
                             "code, the default) or towards alt with loc as written (alt, EasyEdit's)")


def _add_trace_command(commands) -> None:
    trace = commands.add_parser("trace", help="causal trace of one prompt")
    trace.add_argument("prompt")
    trace.add_argument("--subject", help="the subject as written in the prompt (guessed when left out)")
    trace.add_argument("--target", help="answer to measure (default: the clean run's top-1 token)")
    add_trace_options(trace)
    trace.add_argument("--html", dest="html_out", help="write interactive heatmaps here")
    trace.add_argument("--npz", dest="npz_out", help="write ROME's npz layout here (one file per kind: NAME_<kind>.npz)")
    trace.add_argument("--method", default="exact", choices=("exact", "atp"),
                       help="exact (every cell restored, default) or atp (estimated from gradients in seconds)")


def _add_inspect_command(commands) -> None:
    inspect = commands.add_parser("inspect", help="a look inside one cell of a trace: logit lens and its restoration")
    inspect.add_argument("prompt")
    inspect.add_argument("--cell", required=True, help="KIND,TOKEN,LAYER as in the trace's heatmaps, e.g. mlp,4,6")
    inspect.add_argument("--subject", help="the subject as written in the prompt (guessed when left out)")
    inspect.add_argument("--target", help="answer to measure (default: the clean run's top-1 token)")
    add_trace_options(inspect)


def _add_average_command(commands) -> None:
    average = commands.add_parser("average", help="average effects over a known_1000.json-style fact set")
    average.add_argument("facts", help="fact set JSON (ROME's known_1000.json format)")
    average.add_argument("--limit", type=int, help="use the first N facts")
    add_trace_options(average)


def _add_severed_command(commands) -> None:
    severed = commands.add_parser("severed", help="severed-path analysis over facts or prompts")
    severed.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="fact set JSON file(s) or prompts (subject guessed), side by side: "
                              "an input split from the others by an option is an error, never dropped")
    severed.add_argument("--subject", help="subject, for a single prompt")
    severed.add_argument("--limit", type=int, help="use the first N facts")
    add_trace_options(severed)


def _add_known_command(commands) -> None:
    known = commands.add_parser("known", help="how many facts of a fact set the model completes correctly")
    known.add_argument("facts", help="fact set JSON (ROME's known_1000.json format)")
    add_model_options(known)
    known.add_argument("--write-predictions", dest="write_out", help="write the fact set here with each 'prediction' set to the model's top-1 token")
    known.add_argument("--json", dest="json_out", help="write the counts as JSON here")


def _add_edit_command(commands) -> None:
    edit = commands.add_parser("edit", help="rewrite one fact with ROME (or the FT baseline) and compare before/after")
    edit.add_argument("--prompt", required=True, help="template with {} for the subject, e.g. '{} is located in the city of'")
    edit.add_argument("--subject", required=True, help="the subject, e.g. 'The Eiffel Tower'")
    edit.add_argument("--target", required=True, dest="target_new", help="the new object, e.g. ' Rome' (mind the leading space)")
    edit.add_argument("--target-true", dest="target_true", help="the current object (default: the model's top-1 token)")
    add_edit_options(edit)
    # action="extend": a repeated flag adds to the list instead of replacing it. argparse copies the default
    # list before extending it, so the [] below is never shared between parses.
    edit.add_argument("--generate", nargs="+", action="extend", default=[], metavar="PROMPT",
                      help="prompts to complete before and after; " + REPEATABLE.format(name="generate"))
    edit.add_argument("--paraphrase", nargs="+", action="extend", default=[], metavar="PROMPT",
                      help="paraphrases of the edit prompt to score; " + REPEATABLE.format(name="paraphrase"))
    edit.add_argument("--neighborhood", nargs="+", action="extend", default=[], metavar="PROMPT",
                      help="prompts whose answer must stay target_true; " + REPEATABLE.format(name="neighborhood"))
    edit.add_argument("--sample-seed", type=int, help="sample generations (top-k 50) with this seed instead of greedy")
    from ..studies.compare import GENERATION_TOKENS

    edit.add_argument("--tokens", type=int, default=GENERATION_TOKENS, help=f"tokens per generation (default {GENERATION_TOKENS})")
    edit.add_argument("--apply-edit", nargs="+", action="extend", default=[], metavar="FILE",
                      help="saved edits to apply first (stacked); " + REPEATABLE.format(name="apply-edit"))
    edit.add_argument("--save-edit", dest="save_out", help="save the computed edit here (.npz) to re-apply later")
    edit.add_argument("--json", dest="json_out", help="write the report as JSON here")
    add_model_options(edit)


def _add_evaluate_command(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="CounterFact / zsRE metrics of an editing method over a data set")
    evaluate.add_argument("dataset", help="data set JSON: CounterFact (ROME or EasyEdit format) or zsRE (ROME format)")
    evaluate.add_argument("--limit", type=int, help="use the first N cases")
    evaluate.add_argument("--skip-generation", action="store_true", help="skip the fluency and GE (generation entropy) metrics")
    evaluate.add_argument("--skip-decoded", action="store_true",
                          help="skip decoded success (greedy continuations of every prompt, before and after)")
    add_zsre_target_option(evaluate)
    add_edit_options(evaluate)
    evaluate.add_argument("--json", dest="json_out", help="write the result here; per-case lines go to JSON.partial.jsonl as they finish, and a rerun resumes from them")
    add_model_options(evaluate)


def _add_sequential_command(commands) -> None:
    sequential = commands.add_parser("sequential", help="edit a data set's cases one after another on one model, "
                                                        "measuring retention, probe facts and fluency at checkpoints")
    sequential.add_argument("dataset", help="data set JSON, any format evaluate reads")
    sequential.add_argument("--limit", type=int, help="edit the first N cases")
    add_zsre_target_option(sequential)
    sequential.add_argument("--every", type=int, default=10, help="a checkpoint every K edits, and after the last (default 10)")
    from ..studies.health import PROBE_FACTS

    sequential.add_argument("--probes", type=int, default=PROBE_FACTS,
                            help=f"probe facts: the first N of the bundled fact set the unedited model knows (default {PROBE_FACTS})")
    add_edit_options(sequential)
    sequential.add_argument("--json", dest="json_out", help="write the run here (checkpoints and per-edit records)")
    add_model_options(sequential)


def _add_sweep_command(commands) -> None:
    sweep = commands.add_parser("sweep", help="the same edit at every layer, beside the trace's MLP effect at the last subject token")
    sweep.add_argument("--prompt", help="template with {} for the subject (or give --case)")
    sweep.add_argument("--subject", help="the subject")
    sweep.add_argument("--target", dest="target_new", help="the new object, e.g. ' Rome'")
    sweep.add_argument("--target-true", dest="target_true", help="the current object (default: the model's top-1 token)")
    sweep.add_argument("--case", help="a case id of the bundled CounterFact sample: its request, paraphrases and neighbours")
    sweep.add_argument("--layers", help="layers to edit, e.g. 0-17 or 2,4,6 (default: every layer)")
    sweep.add_argument("--paraphrase", nargs="+", action="extend", default=[], metavar="PROMPT",
                       help="paraphrases to score; " + REPEATABLE.format(name="paraphrase"))
    sweep.add_argument("--neighborhood", nargs="+", action="extend", default=[], metavar="PROMPT",
                       help="prompts whose answer must stay target_true; " + REPEATABLE.format(name="neighborhood"))
    from ..tracing import TraceOptions

    sweep.add_argument("--samples", type=int, default=TraceOptions.samples,
                       help=f"corrupted runs for the MLP trace (default {TraceOptions.samples})")
    add_edit_options(sweep, layer=False)
    sweep.add_argument("--json", dest="json_out", help="write the sweep here")
    add_model_options(sweep)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m explorer", description="Locate and edit factual associations (ROME).")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_trace_command(commands)
    _add_inspect_command(commands)
    _add_average_command(commands)
    _add_severed_command(commands)
    _add_known_command(commands)
    _add_edit_command(commands)
    _add_evaluate_command(commands)
    _add_sequential_command(commands)
    _add_sweep_command(commands)
    return parser


def trace_options(args: argparse.Namespace):
    """The trace options, checked before the model loads: a typo costs no wait."""
    from ..tracing import TraceOptions, validate_options

    # --kinds (action extend) is None when never given, else every kind typed; duplicates collapse, in order.
    kinds = tuple(dict.fromkeys(args.kinds)) if args.kinds is not None else TraceOptions.kinds
    options = TraceOptions(
        kinds=kinds, samples=args.samples, window=args.window, noise=args.noise, seed=args.seed, target=getattr(args, "target", None)
    )
    validate_options(options)
    return options


def edit_options(args: argparse.Namespace):
    """Edit options from the command line (checked against the model once it is loaded)."""
    from ..editing import METHODS, EditOptions, StatsSpec, validate_options

    if args.method is not None and (args.method not in (*METHODS, "none") or (args.method == "none" and args.command != "evaluate")):
        raise InputError(f"unknown method {args.method!r}: use one of {', '.join(METHODS)}")
    stats = StatsSpec(corpus=args.stats_corpus, tokens=args.stats_tokens)
    stats.validate()
    method = None if args.method == "none" else args.method
    options = EditOptions(
        method=method, settings=args.settings, layer=getattr(args, "layer", None), stats=stats, shrinkage=args.shrinkage,
        steps=args.steps, clamp_factor=args.clamp_factor, loss_stop=args.loss_stop, strengthen=args.strengthen,
        templates=read_templates_file(args.prefixes_file) if args.prefixes_file else None, stats_file=args.stats_file,
    )
    validate_options(options)  # the checks that need no model, a --stats-file's existence among them
    return options


def chosen_method(args: argparse.Namespace, options) -> str:
    """The method a command runs: 'none' when evaluate is told so, else what the options resolve to."""
    from ..editing import resolved_method

    return "none" if args.method == "none" else resolved_method(options)


def read_templates_file(path: str) -> tuple[str, ...]:
    """The context templates of a --prefixes-file: a JSON list of texts, each with one {}."""
    from ..editing.settings import validate_templates

    templates = read_json_input(path, f"--prefixes-file {path}", "a list of templates")
    validate_templates(templates)
    return tuple(templates)
