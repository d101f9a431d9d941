"""``oloraplus`` command line: a thin layer over the library.

Every user mistake becomes one ``error: ...`` line on stderr and exit code 2.

The run settings have one definition, :class:`~oloraplus.training.config.TrainConfig`: the flags
of ``train`` are derived from its fields by ``transformers.HfArgumentParser`` (each field's help
and choices travel in its metadata), ``evaluate``, ``reproduce`` and ``sweep`` take subsets of the
same fields, a ``--config FILE`` gives defaults for them that flags on the command line override,
and ``train --print-config`` writes the resolved settings as such a file.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
import warnings
from collections.abc import Collection
from dataclasses import field, fields, make_dataclass

from transformers import HfArgumentParser

from oloraplus.data.records import DEFAULT_DATA
from oloraplus.errors import UserError
from oloraplus.evaluation.evaluate import METRIC_MODES
from oloraplus.experiments.grid import TRAIN_FLAGS
from oloraplus.experiments.tune import DEFAULT_N_VAL, TUNE_TRAIN_FLAGS
from oloraplus.method.registry import METHODS
from oloraplus.outputs import check_output_folder
from oloraplus.training.config import EVALUATE_FIELDS, Ratio, TrainConfig, config_yaml, read_settings
from oloraplus.training.distributed import shutdown

# The commands whose flags derive from TrainConfig, and so take --config.
_CONFIG_COMMANDS = ("train", "evaluate", "reproduce", "sweep", "tune")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows a flag's default where it has one and says what a ``--no-X`` switch does."""

    def _get_help_string(self, action):
        if action.nargs == 0 and action.const is False and action.dest != "help":  # --no-X of a boolean
            return f"same as --{action.dest.replace('_', '-')} false"
        if action.required or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class _Parser(HfArgumentParser):
    """An ArgumentParser whose errors are one ``error: ...`` line like every other user error.

    argparse prints the usage and exits on its own; raising :class:`UserError` instead lets
    ``main`` report it the same way as a bad file or value (``--help`` is unaffected).

    ``dataclass_types`` adds one flag per dataclass field, as ``HfArgumentParser`` does. With
    ``given_only`` those flags have no default: the parsed namespace holds only the flags given
    (or set by :meth:`use_settings`), so a grid preset keeps its values for the rest.
    """

    def __init__(self, dataclass_types=None, given_only: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(dataclass_types, **kwargs)
        names = {f.name for dtype in self.dataclass_types for f in fields(dtype)}
        for action in self._actions:
            if action.dest not in names:
                continue
            # Help, usage and errors name --n-train; the --n_train spelling is still accepted.
            action.option_strings = [s for s in action.option_strings if "_" not in s] or action.option_strings
            if action.nargs == "?" and action.const is True:  # a boolean: --compile, or --compile false
                action.metavar = "BOOL"
            if given_only:
                action.default = argparse.SUPPRESS

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")

    def use_settings(self, settings: dict) -> None:
        """Settings from a ``--config`` file as the defaults of their flags: flags on the command line
        still win, and a required flag the file sets is no longer required."""
        self.set_defaults(**settings)
        for action in self._actions:
            if action.dest in settings:
                action.required = False


def settings_dataclass(names: Collection[str], group: str | None = None) -> type:
    """A dataclass of the :class:`TrainConfig` fields ``names``: same types, defaults and help.

    The flags of a command that takes a subset of the settings are derived from it, so they are
    spelled, typed and documented exactly as in ``oloraplus train``.
    """
    hints = typing.get_type_hints(TrainConfig)
    specs = [(f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory,
                                           metadata=f.metadata))
             for f in fields(TrainConfig) if f.name in names]
    return make_dataclass("Settings", specs, namespace={"_argument_group_name": group} if group else None)


def _add_config_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"YAML (.yaml/.yml) or JSON (.json) file of {what} (keys: the flag names with "
                        "'_', e.g. n_train); flags on the command line override it")


def _add_run_commands(sub) -> None:
    """``train`` and ``evaluate``: flags derived from TrainConfig."""
    train = sub.add_parser("train", dataclass_types=TrainConfig, help="fine-tune with OLoRA+ and evaluate")
    _add_config_flag(train, "settings")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved settings as YAML (a --config file) and exit without training")
    evaluate = sub.add_parser("evaluate", dataclass_types=settings_dataclass(EVALUATE_FIELDS),
                              help="re-evaluate a saved adapter")
    evaluate.add_argument("--adapter", required=True, help="adapter folder written by 'oloraplus train'")
    _add_config_flag(evaluate, "settings (a train config works: its training settings are skipped)")


def _add_grid_commands(sub) -> None:
    """``reproduce``, ``sweep`` and ``report``: the experiment grid and its report."""
    flags = settings_dataclass(TRAIN_FLAGS, "train flags (as in 'oloraplus train', for every run; absent ones "
                                            "keep the preset's value, else train's default)")
    reproduce = sub.add_parser("reproduce", dataclass_types=flags, given_only=True,
                               help="run the paper's comparison grid (resumable) and write the report")
    reproduce.add_argument("--preset", choices=["quick", "local", "paper"], required=True,
                           help="quick: smollm2-135m, 200/100 records; local: smollm2-135m + gemma3-270m, "
                                "1000/500; paper: tinyllama-1.1b, opt-1.3b, gemma-2b, 1000/500")
    reproduce.add_argument("--models", nargs="+", default=None, help="replace the preset's models")
    reproduce.add_argument("--output", default=None, help="grid folder (default runs/<preset>)")
    sweep = sub.add_parser("sweep", dataclass_types=flags, given_only=True,
                           help="run any models x methods x ratios x seeds grid (resumable)")
    sweep.add_argument("--models", nargs="+", required=True)
    sweep.add_argument("--methods", nargs="+", default=["olora", "olora-plus"], choices=METHODS.keys(),
                       help="-plus methods get one run per ratio; ratio 1 means the single-rate method")
    sweep.add_argument("--output", required=True, help="grid folder")
    for p in (reproduce, sweep):
        p.add_argument("--ratios", nargs="+", default=None,
                       help="lambda values beside the baseline, e.g. 1/16 16 (default) or 0.25 4")
        p.add_argument("--seeds", type=int, default=3 if p is sweep else None, help="seeds 0..N-1 (default 3; the quick preset 2)")
        p.add_argument("--reuse", nargs="+", default=(), metavar="DIR",
                       help="other grid folders: a finished run with the same settings there is copied, not rerun")
        p.add_argument("--track-seeds", type=int, nargs="+", default=[0],
                       help="seeds whose runs track dynamics (with --track-dynamics)")
        _add_config_flag(p, "train flags for every run")
    rescore = sub.add_parser("rescore", help="score a grid's saved adapters again in another metrics mode (no training)")
    rescore.add_argument("dir", metavar="DIR", help="grid folder with runs.jsonl and run folders with adapters")
    rescore.add_argument("--metrics-mode", choices=METRIC_MODES, required=True)
    rescore.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: all)")
    rescore.add_argument("--output", required=True, help="grid folder to write (runs.jsonl, run folders, report)")
    report = sub.add_parser("report", help="tables and figures from a grid folder's runs.jsonl")
    report.add_argument("dir", metavar="DIR", help="grid folder (or its runs.jsonl)")
    report.add_argument("--output", default=None, help="where to write the report (default DIR)")
    report.add_argument("--analysis", nargs="+", default=None, metavar="FILE",
                        help="analysis.json files for the regime section (default DIR/analysis/analysis.json and DIR/analysis/*/analysis.json)")
    report.add_argument("--tuned", action="store_true",
                        help="DIR is an 'oloraplus tune --final-seeds N' folder: the best-vs-best report of its "
                             "final runs (DIR/final/*) and trials.csv, with paired t and bootstrap intervals and "
                             "Holm-corrected tests")


def _add_tune_command(sub) -> None:
    """``tune``: Optuna search on the validation loss (experiments/tune.py); train flags as in ``sweep``."""
    flags = settings_dataclass(TUNE_TRAIN_FLAGS, "train flags (as in 'oloraplus train', for every trial; "
                                                 f"--n-val defaults to {DEFAULT_N_VAL} here)")
    tune = sub.add_parser("tune", dataclass_types=flags, given_only=True,
                          help="search lr (and lambda, dropout) per method with Optuna on the validation loss "
                               "(resumable, several workers or machines on one study)")
    tune.add_argument("--model", required=True, help="registry name, hub id, checkpoint folder or .gguf file")
    tune.add_argument("--methods", nargs="+", default=["olora", "olora-plus"], choices=METHODS.keys(),
                      help="one study per method, each with --trials trials")
    tune.add_argument("--trials", type=int, required=True,
                      help="finished (complete or pruned) trials per method; a resumed study runs the missing ones; "
                           "0 runs none and writes best.json, trials.csv and the figures from the study as it is")
    tune.add_argument("--output", required=True, help="folder for best.json, trials.csv, figures and trial runs")
    tune.add_argument("--storage", default=None,
                      help="where the study lives: sqlite:///FILE, postgresql://USER@HOST/DB or mysql://... "
                           "(shared by machines), or journal:FILE (default sqlite:///OUTPUT/optuna.db)")
    tune.add_argument("--study-name", default="oloraplus",
                      help="studies are named STUDY_NAME.MODEL.METHOD in the storage")
    tune.add_argument("--workers", type=int, default=1,
                      help="trials run side by side here, the CPU cores divided between them")
    tune.add_argument("--lr-range", nargs=2, type=float, default=[1e-5, 1e-2], metavar=("LOW", "HIGH"),
                      help="learning rate lr_A, searched on a log scale")
    tune.add_argument("--ratio-range", nargs=2, type=Ratio, default=[1 / 16, 16.0], metavar=("LOW", "HIGH"),
                      help="lambda = lr_B / lr_A of the -plus methods, log scale (fractions such as 1/16 work)")
    tune.add_argument("--tune-dropout", action="store_true", help="search the dropout too (--dropout-range)")
    tune.add_argument("--dropout-range", nargs=2, type=float, default=[0.0, 0.2], metavar=("LOW", "HIGH"),
                      help="dropout range with --tune-dropout")
    tune.add_argument("--no-prune", action="store_true",
                      help="never prune (default: a trial whose --eval-steps validation losses are worse than "
                           "the median of earlier trials at that step is stopped)")
    tune.add_argument("--heartbeat", type=float, default=60.0, metavar="SECONDS",
                      help="a running trial's heartbeat interval in a database storage; a trial silent for twice "
                           "this long (a killed worker) is marked failed and run again")
    tune.add_argument("--fail-running", action="store_true",
                      help="first mark the studies' running trials failed (after a killed worker, with journal "
                           "storage, which has no heartbeat; only when no worker is running)")
    tune.add_argument("--widen", action="store_true",
                      help="resume a study with searched ranges (--lr-range, --ratio-range, --dropout-range) that "
                           "contain its own: the next trials search the wider ranges, the finished ones still "
                           "count (recorded in the study and best.json); other settings must stay the same")
    tune.add_argument("--final-seeds", type=int, default=0, metavar="N",
                      help="after the search, train each method's best setting with seeds 0..N-1 (data seed "
                           "--data-seed + s, all training records, evaluated) into OUTPUT/final/METHOD-sS "
                           "(resumable), then write OUTPUT/report.md; 0: no final runs")
    _add_config_flag(tune, "train flags for every trial")


def _add_export_command(sub) -> None:
    export = sub.add_parser("export", help="turn a trained adapter into a standard LoRA adapter or a merged model")
    export.add_argument("--model", required=True, help="the base model the adapter was trained on")
    export.add_argument("--adapter", required=True, help="adapter folder written by 'oloraplus train' (RUN/adapter)")
    export.add_argument("--to", required=True, choices=["lora", "merged"],
                        help="lora: an init-independent LoRA adapter for the untouched base model; "
                             "merged: a full checkpoint with the update merged in")
    export.add_argument("--output", required=True, help="folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")


def _add_generate_command(sub) -> None:
    from oloraplus.training.generate import GenerateSettings

    generate = sub.add_parser("generate", dataclass_types=GenerateSettings,
                              help="answer prompts with a trained adapter (greedy unless --temperature)")
    generate.add_argument("--model", required=True, help="the base model the adapter was trained on")
    generate.add_argument("--adapter", required=True, help="adapter folder (RUN/adapter or RUN/adapter-lora)")
    generate.add_argument("--prompt", default=None, help="one prompt: the response streams to stdout")
    generate.add_argument("--input", default=None, metavar="FILE",
                          help=".txt (one prompt a line) or .jsonl (strings or {\"prompt\": ...}) file of prompts: "
                               "one JSON line {prompt, response} each")
    generate.add_argument("--output", default=None, metavar="FILE",
                          help="with --input: write the JSON lines to this new file instead of stdout")


def build_parser(settings: dict[str, dict] | None = None) -> argparse.ArgumentParser:
    """The ``oloraplus`` parser; ``settings`` maps a command to the ``--config`` file settings
    that become the defaults of its flags."""
    parser = _Parser(prog="oloraplus", description="OLoRA+ fine-tuning and the OLoRA+ reproduction")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    models = sub.add_parser("models", help="list or pull models").add_subparsers(dest="models_command", required=True)
    models.add_parser("list", help="the model registry")
    pull = models.add_parser("pull", help="download/convert a model now")
    pull.add_argument("name")
    analyze = sub.add_parser("analyze", help="measure how far trained adapters moved from their start")
    analyze.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by 'oloraplus train'")
    analyze.add_argument("--output", required=True, help="folder for analysis.json and plots")
    _add_grid_commands(sub)
    _add_export_command(sub)
    _add_generate_command(sub)
    _add_tune_command(sub)
    bench = sub.add_parser(
        "bench", help="speed of our stack vs the Trainer at its defaults (the paper's stack) and "
                      "configured (bf16, length-grouped batches, SDPA), side by side",
        description="Trains the same records with three stacks (the Trainer at its defaults, the Trainer configured "
                    "as a knowing user runs it, ours), each in its own child process, alternated over data orders "
                    "(256 records, 3 orders; --quick: 128 records, 1 order), and times the OLoRA init, the OLoRA+ "
                    "against the OLoRA step, greedy generation against a one-prompt-at-a-time loop (with the share "
                    "of identical outputs) and the roofline fraction against a bf16 matmul peak measured in the same "
                    "run. Writes --output (JSON, with the host's CPU and library versions) and prints a table. "
                    "Needs a quiet machine: other work on the cores moves every ratio.")
    bench.add_argument("--quick", action="store_true", help="smollm2-135m only (unless --model), 128 records, 1 data "
                                                            "order")
    bench.add_argument("--model", nargs="+", default=None, help="models (default: smollm2-135m, plus gemma3-270m unless --quick)")
    bench.add_argument("--data", default=DEFAULT_DATA)
    bench.add_argument("--output", required=True, help="JSON file to write")
    bench.add_argument("--paper-size", action="store_true",
                       help="also a TinyLlama-1.1B-shaped model with random weights: a few steps of each stack, "
                            "with and without gradient checkpointing (tokens/s, peak memory)")
    bench.add_argument("--paper-size-only", action="store_true", help="only the --paper-size rows (no models)")
    for command, values in (settings or {}).items():
        sub.choices[command].use_settings(values)
    return parser


def _scan_config(argv: list[str]) -> tuple[str | None, str | None]:
    """The command and the ``--config`` file of a command line, before it is parsed (the file's
    settings must be in place as defaults when the flags are parsed)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    path = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name, equals, value = arg.partition("=")
        if len(name) > 3 and "--config".startswith(name):  # argparse takes a prefix such as --conf too
            path = value if equals else argv[i + 1] if i + 1 < len(argv) else None
    return command, path


def _file_settings(command: str, path: str) -> dict:
    """The settings a ``--config`` file gives ``command`` (checked against the fields it takes)."""
    names = [f.name for f in fields(TrainConfig)]
    if command == "train":
        return read_settings(path, names)
    if command == "evaluate":
        return read_settings(path, EVALUATE_FIELDS, ignored=[n for n in names if n not in EVALUATE_FIELDS])
    if command == "tune":
        return read_settings(path, TUNE_TRAIN_FLAGS)
    return read_settings(path, TRAIN_FLAGS)


def _config_from_args(args, names) -> TrainConfig:
    """The TrainConfig of a parsed ``train`` (all fields) or ``evaluate`` (``names``) command line."""
    return TrainConfig(**{name: getattr(args, name) for name in names})


def _print_metrics(results: dict, output: str) -> None:
    m = results["metrics"]
    if "val_loss" in m:  # --n-val
        print(f"val_loss {m['val_loss']:.4f}")
    if "eval_loss" in m:  # absent with --no-evaluate
        print(
            f"eval_loss {m['eval_loss']:.4f}  perplexity {m['perplexity']:.2f}  BLEU {m['bleu']:.2f}  "
            f"ROUGE-1 {m['rouge1']:.2f}  ROUGE-2 {m['rouge2']:.2f}  ROUGE-L {m['rougeL']:.2f}  "
            f"({results['evaluation']['metrics_mode']})"
        )
    print(f"wrote {os.path.join(output, 'results.json')}")


def _write_report(source: str, output: str, analyses: list[str] | None = None) -> None:
    from oloraplus.experiments.report import build_report

    files = build_report(source, output, analyses)
    for path in (files.markdown, files.csv, files.latex, files.figure_metrics, files.figure_ratio,
                 files.figure_dynamics, files.figure_drift_ratio):
        if path is not None:
            print(f"wrote {path}")


def _grid_command(args) -> int:
    """Hand a parsed reproduce/sweep/rescore/report command to experiments/grid.py / experiments/report.py."""
    if args.command == "report" and args.tuned:
        from oloraplus.experiments.tuned_report import build_tuned_report

        files = build_tuned_report(args.dir, args.output, analyses=args.analysis)
        print(f"wrote {files.markdown}\nwrote {files.csv}")
        return 0
    if args.command == "report":
        source = args.dir
        _write_report(source, args.output or (source if os.path.isdir(source) else os.path.dirname(source) or "."),
                      args.analysis)
        return 0
    if args.command == "rescore":
        from oloraplus.experiments.grid import rescore_grid

        check_output_folder(args.output, inputs=[args.dir])  # never into the grid it reads
        outcome = rescore_grid(args.dir, args.output, args.metrics_mode, args.seeds)
        _write_report(args.output, args.output)
        return 0 if outcome.ok else 1
    from oloraplus.experiments.grid import GridSpec, parse_ratio, preset_grid, run_and_report

    flags = {k: getattr(args, k) for k in TRAIN_FLAGS if hasattr(args, k)}  # given, or from --config
    ratios = [parse_ratio(r) for r in args.ratios] if args.ratios else None
    if args.command == "reproduce":
        grid = preset_grid(args.preset, args.models, ratios, args.seeds, **flags)
        grid.track_seeds = tuple(args.track_seeds)
        output = args.output or os.path.join("runs", args.preset)
    else:
        grid = GridSpec(models=args.models, methods=args.methods, seeds=args.seeds, flags=flags,
                        track_seeds=tuple(args.track_seeds), **({"ratios": ratios} if ratios else {}))
        output = args.output
    # Read-only checks before the first run: a grid folder is written to for hours.
    check_output_folder(output, inputs=[flags.get("data", DEFAULT_DATA), *grid.models, *args.reuse])
    return 0 if run_and_report(grid.expand(), output, reuse=args.reuse).ok else 1


def _tune_command(args) -> int:
    from oloraplus.experiments.tune import TuneSpec, run_final, tune

    spec = TuneSpec(
        model=args.model, methods=list(args.methods), trials=args.trials, output=args.output, storage=args.storage,
        study_name=args.study_name, workers=args.workers, lr_range=tuple(args.lr_range),
        ratio_range=tuple(float(r) for r in args.ratio_range),
        dropout_range=tuple(args.dropout_range) if args.tune_dropout else None, prune=not args.no_prune,
        heartbeat=args.heartbeat, fail_running=args.fail_running, widen=args.widen, final_seeds=args.final_seeds,
        flags={k: getattr(args, k) for k in TUNE_TRAIN_FLAGS if hasattr(args, k)},  # given, or from --config
    )
    best = tune(spec)
    for method, entry in best["methods"].items():
        counts = ", ".join(f"{n} {s.lower()}" for s, n in entry["trials"].items() if n)
        if "val_loss" in entry:
            params = "  ".join(f"{k} {v:.4g}" for k, v in entry["params"].items())
            print(f"{method}: best val_loss {entry['val_loss']:.4f}  {params}  (trial {entry['trial']}; {counts})")
            print(f"{method}: train it with: oloraplus train --config {entry['train_config']}")
            for edge in entry["near_edge"]:
                flag, side = edge.rsplit(" ", 1)
                print(f"{method}: the best setting is near the {side} end of {flag}: the optimum may lie beyond "
                      f"it; widen that side (--widen) and run more trials")
        else:
            print(f"{method}: no complete trial ({counts or 'none run'})")
    for name in ("best.json", "trials.csv", "figure_val_loss_vs_lr.png"):
        print(f"wrote {os.path.join(args.output, name)}")
    if spec.final_seeds:
        return 0 if run_final(spec).ok else 1
    return 0


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command, config_file = _scan_config(argv)
    settings = {command: _file_settings(command, config_file)} if config_file and command in _CONFIG_COMMANDS else {}
    args = build_parser(settings).parse_args(argv)
    if getattr(args, "config", None) != config_file:  # an abbreviation such as --conf
        raise UserError("write --config in full")
    if getattr(args, "progress", True) is False:  # also transformers' "Loading weights" bars on stderr
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.command == "tune":
        return _tune_command(args)
    if args.command in ("reproduce", "sweep", "rescore", "report"):
        return _grid_command(args)
    if args.command == "train":
        from oloraplus.training.recipe import train

        config = _config_from_args(args, [f.name for f in fields(TrainConfig)])
        config.validate()  # before any model is loaded
        if args.print_config:
            print(config_yaml(config), end="")
            return 0
        results = train(config)
        if results:  # empty on the non-main processes of a torchrun launch
            _print_metrics(results, args.output)
    elif args.command == "evaluate":
        from oloraplus.training.recipe import evaluate_adapter

        config = _config_from_args(args, EVALUATE_FIELDS)
        config.validate(EVALUATE_FIELDS)
        _print_metrics(evaluate_adapter(config, args.adapter), args.output)
    elif args.command == "models":
        from oloraplus.models.loading import list_models, pull_model

        if args.models_command == "list":
            for row in list_models():
                ready = {True: "ready", False: "not installed", None: "hub"}[row["ready"]]
                print(f"{row['name']:16} {ready:14} {row['source']:55} {row['description']}")
        else:
            print(pull_model(args.name))
    elif args.command == "export":
        from oloraplus.method.export import export_adapter

        print(f"wrote {export_adapter(args.model, args.adapter, args.to, args.output, args.overwrite)}")
    elif args.command == "generate":
        from transformers.utils import logging as hf_logging

        from oloraplus.training.generate import GenerateSettings, generate_command

        hf_logging.disable_progress_bar()  # stdout/stderr hold the answers and errors only
        settings = GenerateSettings(**{f.name: getattr(args, f.name) for f in fields(GenerateSettings)})
        generate_command(args.model, args.adapter, args.prompt, args.input, args.output, settings, sys.stdout)
    elif args.command == "analyze":
        from oloraplus.analysis.drift import analyze_runs, summary_lines

        check_output_folder(args.output, inputs=args.runs)

        print("\n".join(summary_lines(analyze_runs(args.runs, args.output))))
        print(f"wrote {os.path.join(args.output, 'analysis.json')}")
    elif args.command == "bench":
        harness = _bench_harness()

        models = args.model or (["smollm2-135m"] if args.quick else ["smollm2-135m", "gemma3-270m"])
        paper_size = harness.PAPER_SIZE if args.paper_size or args.paper_size_only else None
        harness.run_bench([] if args.paper_size_only else models, args.quick, args.output, args.data,
                          paper_size=paper_size)
    return 0


def _bench_harness():
    """The benchmark harness, ``bench/harness.py`` of the source checkout (it is not part of the package)."""
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "harness.py").is_file():
        raise UserError("'oloraplus bench' runs from a source checkout of oloraplus (bench/harness.py beside src/)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("bench.harness")


def main(argv: list[str] | None = None) -> int:
    # Library deprecation notices (transformers/peft internals) are not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()  # under torchrun: close the process group before the interpreter exits


if __name__ == "__main__":
    raise SystemExit(main())
