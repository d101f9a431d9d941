"""Probe: the paper-size rows of `oloraplus bench` for ours and the configured Trainer only,
alternated (ours, configured, ours, configured): the training peak RSS (`VmHWM` after
`clear_refs`) and the process peak of each, side by side in one run, with gradient checkpointing
or (`--no-checkpointing`) without. The defaults column is left out: without checkpointing it
needs up to 23 GB, more than fits beside other work on a 24 GiB host (the configured Trainer's
18.5 GB fits only on a quiet one; `--ours-only` leaves it out too: its code does not change with ours').

Run from the repo root:
  .venv/bin/python -m bench.paper_size_memory_probe OUTPUT.json [ROUNDS] [--no-checkpointing] [--ours-only]
(bench/NOTES.md has the numbers).
"""
import json
import sys
import time
from pathlib import Path

from bench.harness import PAPER_SIZE, machine, paper_size_config, run_paper_size_stack
from oloraplus.data.records import DEFAULT_DATA
from oloraplus.training.provenance import library_versions


def main() -> None:
    args = [a for a in sys.argv[1:] if a not in ("--no-checkpointing", "--ours-only")]
    checkpointing = "--no-checkpointing" not in sys.argv[1:]
    stacks = ("ours",) if "--ours-only" in sys.argv[1:] else ("ours", "configured")
    output, rounds = args[0], int(args[1]) if len(args) > 1 else 2
    result = {"machine": machine(), "versions": library_versions(), "checkpointing": checkpointing, "rows": []}
    with paper_size_config(DEFAULT_DATA, PAPER_SIZE) as cfg:
        for k in range(rounds):
            for kind in stacks:
                t = time.perf_counter()
                r = run_paper_size_stack(kind, cfg, checkpointing=checkpointing)
                row = {"stack": kind, "round": k, "checkpointing": checkpointing, "wall_seconds": time.perf_counter() - t,
                       **{key: r[key] for key in ("tokens_per_second", "train_peak_rss_mb", "peak_rss_mb",
                                                  "huge_page_allocations")}}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
    Path(output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
