"""``oloraplus`` command line: a thin layer over the library.

Every user mistake becomes one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from oloraplus.data.records import DEFAULT_DATA
from oloraplus.errors import UserError
from oloraplus.fast.attention import ATTENTIONS, CPU_EAGER_MAX_LENGTH
from oloraplus.training.distributed import shutdown


def _add_run_flags(p: argparse.ArgumentParser, train: bool) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registry name, hub id, checkpoint folder or .gguf file")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="Alpaca .json/.jsonl file or hub dataset id (e.g. tatsu-lab/alpaca)")
    p.add_argument("--output", required=True, help="run folder to write")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--data-seed", type=int, default=42)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--metrics-mode", choices=["generation", "teacher-forced"], default="generation",
                   help="BLEU/ROUGE from greedy generation, or from argmax next-token predictions on the reference")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware has native bf16, else fp32")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--generation-batch-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if train:
        p.add_argument("--method", required=True, choices=["lora", "olora", "lora-plus", "olora-plus"])
        p.add_argument("--ratio", type=float, default=None, help="lambda = lr_B / lr_A (the -plus methods)")
        p.add_argument("--rank", type=int, default=32)
        p.add_argument("--alpha", type=float, default=16)
        p.add_argument("--dropout", type=float, default=0.0)
        p.add_argument("--lr", type=float, default=3e-4)
        p.add_argument("--weight-decay", type=float, default=0.0)
        p.add_argument("--epochs", type=float, default=1)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--max-steps", type=int, default=None)
        p.add_argument("--attention", choices=list(ATTENTIONS), default="auto",
                       help=f"training attention kernel; auto: grouped (our eager kernel) for batches up to "
                            f"{CPU_EAGER_MAX_LENGTH} tokens on CPU, else SDPA; eager: transformers' own")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile each decoder layer for training: about 50 s (8 s with inductor's "
                            "disk cache warm) before the first step, then faster steps (1.10-1.13x on CPU); for long runs")
        p.add_argument("--target-modules", nargs="+", default=None,
                       help="module names to adapt (default: every attention and MLP Linear)")
        p.add_argument("--no-group-by-length", action="store_true", help="random batches (slower)")
        p.add_argument("--track-dynamics", type=int, default=None, metavar="K",
                       help="every K steps append adapter drift metrics to OUTPUT/dynamics.jsonl")
        p.add_argument("--save-steps", type=int, default=None, metavar="N",
                       help="checkpoint every N steps into OUTPUT/checkpoints (needed for --resume)")
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from the latest checkpoint in --output (same flags)")
    else:
        p.add_argument("--adapter", required=True, help="adapter folder written by 'oloraplus train'")


# Train flags a grid command passes to all its runs; absent flags keep the preset's (or train's) value.
_GRID_TRAIN_FLAGS: tuple[tuple[str, dict], ...] = (
    ("--data", {"help": "Alpaca .json/.jsonl file or hub dataset id"}),
    ("--n-train", {"type": int}), ("--n-eval", {"type": int}), ("--data-seed", {"type": int}),
    ("--max-length", {"type": int}), ("--max-new-tokens", {"type": int}),
    ("--metrics-mode", {"choices": ["generation", "teacher-forced"]}),
    ("--precision", {"choices": ["auto", "bf16", "fp32"]}),
    ("--attention", {"choices": list(ATTENTIONS)}),
    ("--eval-batch-size", {"type": int}), ("--generation-batch-size", {"type": int}),
    ("--rank", {"type": int}), ("--alpha", {"type": float}), ("--dropout", {"type": float}),
    ("--lr", {"type": float, "help": "lr_A; lr_B = ratio * lr_A"}), ("--weight-decay", {"type": float}),
    ("--epochs", {"type": float}), ("--batch-size", {"type": int}), ("--max-steps", {"type": int}),
    ("--target-modules", {"nargs": "+"}),
)


def _add_grid_commands(sub) -> None:
    """``reproduce``, ``sweep`` and ``report``: the experiment grid and its report."""
    reproduce = sub.add_parser("reproduce", help="run the paper's comparison grid (resumable) and write the report")
    reproduce.add_argument("--preset", choices=["quick", "local", "paper"], required=True,
                           help="quick: smollm2-135m, 200/100 records; local: smollm2-135m + gemma3-270m, "
                                "1000/500; paper: tinyllama-1.1b, opt-1.3b, gemma-2b, 1000/500")
    reproduce.add_argument("--models", nargs="+", default=None, help="replace the preset's models")
    reproduce.add_argument("--output", default=None, help="grid folder (default runs/<preset>)")
    sweep = sub.add_parser("sweep", help="run any models x methods x ratios x seeds grid (resumable)")
    sweep.add_argument("--models", nargs="+", required=True)
    sweep.add_argument("--methods", nargs="+", default=["olora", "olora-plus"],
                       choices=["lora", "olora", "lora-plus", "olora-plus"],
                       help="-plus methods get one run per ratio; ratio 1 means the single-rate method")
    sweep.add_argument("--output", required=True, help="grid folder")
    for p in (reproduce, sweep):
        p.add_argument("--ratios", nargs="+", default=None,
                       help="lambda values beside the baseline, e.g. 1/16 16 (default) or 0.25 4")
        p.add_argument("--seeds", type=int, default=3 if p is sweep else None, help="seeds 0..N-1 (default 3; the quick preset 2)")
        p.add_argument("--reuse", nargs="+", default=(), metavar="DIR",
                       help="other grid folders: a finished run with the same settings there is copied, not rerun")
        group = p.add_argument_group("train flags (same meaning as in 'oloraplus train')")
        for flag, kwargs in _GRID_TRAIN_FLAGS:
            group.add_argument(flag, default=argparse.SUPPRESS, **kwargs)
        group.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                           default=argparse.SUPPRESS, help="random batches (slower)")
        group.add_argument("--compile", action="store_true", default=argparse.SUPPRESS,
                           help="torch.compile each decoder layer in every run (see 'oloraplus train --help')")
        group.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                           help="no progress bars")
        group.add_argument("--track-dynamics", type=int, default=argparse.SUPPRESS, metavar="K",
                           help="record adapter drift every K steps (dynamics.jsonl) in the runs of --track-seeds")
        group.add_argument("--track-seeds", type=int, nargs="+", default=[0], help="seeds whose runs track dynamics")
    rescore = sub.add_parser("rescore", help="score a grid's saved adapters again in another metrics mode (no training)")
    rescore.add_argument("dir", metavar="DIR", help="grid folder with runs.jsonl and run folders with adapters")
    rescore.add_argument("--metrics-mode", choices=["generation", "teacher-forced"], required=True)
    rescore.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: all)")
    rescore.add_argument("--output", required=True, help="grid folder to write (runs.jsonl, run folders, report)")
    report = sub.add_parser("report", help="tables and figures from a grid folder's runs.jsonl")
    report.add_argument("dir", metavar="DIR", help="grid folder (or its runs.jsonl)")
    report.add_argument("--output", default=None, help="where to write the report (default DIR)")
    report.add_argument("--analysis", nargs="+", default=None, metavar="FILE",
                        help="analysis.json files for the regime section (default DIR/analysis/analysis.json and DIR/analysis/*/analysis.json)")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``error: ...`` line like every other user error.

    argparse prints the usage and exits on its own; raising :class:`UserError` instead lets
    ``main`` report it the same way as a bad file or value (``--help`` is unaffected).
    """

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def _add_export_command(sub) -> None:
    export = sub.add_parser("export", help="turn a trained adapter into a standard LoRA adapter or a merged model")
    export.add_argument("--model", required=True, help="the base model the adapter was trained on")
    export.add_argument("--adapter", required=True, help="adapter folder written by 'oloraplus train' (RUN/adapter)")
    export.add_argument("--to", required=True, choices=["lora", "merged"],
                        help="lora: an init-independent LoRA adapter for the untouched base model; "
                             "merged: a full checkpoint with the update merged in")
    export.add_argument("--output", required=True, help="folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oloraplus", description="OLoRA+ fine-tuning and the OLoRA+ reproduction")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_flags(sub.add_parser("train", help="fine-tune with OLoRA+ and evaluate"), train=True)
    _add_run_flags(sub.add_parser("evaluate", help="re-evaluate a saved adapter"), train=False)
    models = sub.add_parser("models", help="list or pull models").add_subparsers(dest="models_command", required=True)
    models.add_parser("list", help="the model registry")
    pull = models.add_parser("pull", help="download/convert a model now")
    pull.add_argument("name")
    analyze = sub.add_parser("analyze", help="measure how far trained adapters moved from their start")
    analyze.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by 'oloraplus train'")
    analyze.add_argument("--output", required=True, help="folder for analysis.json and plots")
    _add_grid_commands(sub)
    _add_export_command(sub)
    bench = sub.add_parser("bench", help="speed of our stack vs the paper's (plain Trainer + PEFT), side by side")
    bench.add_argument("--quick", action="store_true", help="smollm2-135m, 128 records (under 10 minutes)")
    bench.add_argument("--model", nargs="+", default=None, help="models (default: smollm2-135m, plus gemma3-270m unless --quick)")
    bench.add_argument("--data", default=DEFAULT_DATA)
    bench.add_argument("--output", required=True, help="JSON file to write")
    return parser


def _config_from_args(args, train: bool):
    from oloraplus.training.config import TrainConfig

    fields = {
        "output": args.output, "model": args.model, "data": args.data, "n_train": args.n_train,
        "n_eval": args.n_eval, "data_seed": args.data_seed, "max_length": args.max_length,
        "max_new_tokens": args.max_new_tokens, "metrics_mode": args.metrics_mode, "precision": args.precision,
        "eval_batch_size": args.eval_batch_size, "generation_batch_size": args.generation_batch_size,
        "overwrite": args.overwrite, "progress": not args.no_progress,
    }
    if train:
        fields.update(
            method=args.method, ratio=args.ratio, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
            lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs, batch_size=args.batch_size,
            seed=args.seed, max_steps=args.max_steps, target_modules=args.target_modules,
            group_by_length=not args.no_group_by_length, track_dynamics=args.track_dynamics,
            save_steps=args.save_steps, resume=args.resume, attention=args.attention,
            compile=args.compile,
        )
    return TrainConfig(**fields)


def _print_metrics(results: dict, output: str) -> None:
    m = results["metrics"]
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
    """Hand a parsed reproduce/sweep/rescore/report command to experiments.py / report.py."""
    if args.command == "report":
        source = args.dir
        _write_report(source, args.output or (source if os.path.isdir(source) else os.path.dirname(source) or "."),
                      args.analysis)
        return 0
    if args.command == "rescore":
        from oloraplus.experiments.grid import rescore_grid

        outcome = rescore_grid(args.dir, args.output, args.metrics_mode, args.seeds)
        _write_report(args.output, args.output)
        return 0 if outcome.ok else 1
    from oloraplus.experiments.grid import TRAIN_FLAGS, GridSpec, parse_ratio, preset_grid, run_and_report

    flags = {k: v for k, v in vars(args).items() if k in TRAIN_FLAGS}
    ratios = [parse_ratio(r) for r in args.ratios] if args.ratios else None
    if args.command == "reproduce":
        grid = preset_grid(args.preset, args.models, ratios, args.seeds, **flags)
        grid.track_seeds = tuple(args.track_seeds)
        output = args.output or os.path.join("runs", args.preset)
    else:
        grid = GridSpec(models=args.models, methods=args.methods, seeds=args.seeds, flags=flags,
                        track_seeds=tuple(args.track_seeds), **({"ratios": ratios} if ratios else {}))
        output = args.output
    return 0 if run_and_report(grid.expand(), output, reuse=args.reuse).ok else 1


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "no_progress", False):  # also transformers' "Loading weights" bars on stderr
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.command in ("reproduce", "sweep", "rescore", "report"):
        return _grid_command(args)
    if args.command == "train":
        from oloraplus.training.recipe import train

        config = _config_from_args(args, train=True)
        config.validate()  # before any model is loaded
        results = train(config)
        if results:  # empty on the non-main processes of a torchrun launch
            _print_metrics(results, args.output)
    elif args.command == "evaluate":
        from oloraplus.training.recipe import evaluate_adapter

        _print_metrics(evaluate_adapter(_config_from_args(args, train=False), args.adapter), args.output)
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
    elif args.command == "analyze":
        from oloraplus.analysis.drift import analyze_runs, summary_lines

        print("\n".join(summary_lines(analyze_runs(args.runs, args.output))))
        print(f"wrote {os.path.join(args.output, 'analysis.json')}")
    elif args.command == "bench":
        run_bench = _bench_harness().run_bench

        models = args.model or (["smollm2-135m"] if args.quick else ["smollm2-135m", "gemma3-270m"])
        run_bench(models, args.quick, args.output, args.data)
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
