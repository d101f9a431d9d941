"""``oloraplus`` command line: a thin layer over the library.

Every user mistake becomes one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UserError


def _add_run_flags(p: argparse.ArgumentParser, train: bool) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registry name, hub id, checkpoint folder or .gguf file")
    p.add_argument("--data", default="../shared/data/alpaca/alpaca_data.json",
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
    p.add_argument("--generation-batch-size", type=int, default=16)
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
        p.add_argument("--target-modules", nargs="+", default=None,
                       help="module names to adapt (default: every attention and MLP Linear)")
        p.add_argument("--no-group-by-length", action="store_true", help="random batches (slower)")
    else:
        p.add_argument("--adapter", required=True, help="adapter folder written by 'oloraplus train'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oloraplus", description="OLoRA+ fine-tuning and the OLoRA+ reproduction")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_flags(sub.add_parser("train", help="fine-tune with OLoRA+ and evaluate"), train=True)
    _add_run_flags(sub.add_parser("evaluate", help="re-evaluate a saved adapter"), train=False)
    models = sub.add_parser("models", help="list or pull models").add_subparsers(dest="models_command", required=True)
    models.add_parser("list", help="the model registry")
    pull = models.add_parser("pull", help="download/convert a model now")
    pull.add_argument("name")
    return parser


def _config_from_args(args, train: bool):
    from .train import TrainConfig

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
            group_by_length=not args.no_group_by_length,
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


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .train import train

        config = _config_from_args(args, train=True)
        config.validate()  # before any model is loaded
        _print_metrics(train(config), args.output)
    elif args.command == "evaluate":
        from .train import evaluate_adapter

        _print_metrics(evaluate_adapter(_config_from_args(args, train=False), args.adapter), args.output)
    elif args.command == "models":
        from .models import list_models, pull_model

        if args.models_command == "list":
            for row in list_models():
                ready = {True: "ready", False: "not installed", None: "hub"}[row["ready"]]
                print(f"{row['name']:16} {ready:14} {row['source']:55} {row['description']}")
        else:
            print(pull_model(args.name))
    return 0




def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
