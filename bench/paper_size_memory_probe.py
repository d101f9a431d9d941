"""Probe: the paper-size rows of `oloraplus bench` with gradient checkpointing only, ours and the
configured Trainer, alternated (ours, configured, ours, configured): the training peak RSS
(`VmHWM` after `clear_refs`) of each, side by side in one run. The rows without checkpointing
need up to 23 GB for the defaults column, more than fits beside other work on a 24 GiB host.

Run from the repo root: .venv/bin/python -m bench.paper_size_memory_probe OUTPUT.json [ROUNDS]
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
    output, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
    result = {"machine": machine(), "versions": library_versions(), "rows": []}
    with paper_size_config(DEFAULT_DATA, PAPER_SIZE) as cfg:
        for k in range(rounds):
            for kind in ("ours", "configured"):
                t = time.perf_counter()
                r = run_paper_size_stack(kind, cfg, checkpointing=True)
                row = {"stack": kind, "round": k, "wall_seconds": time.perf_counter() - t,
                       **{key: r[key] for key in ("tokens_per_second", "train_peak_rss_mb", "peak_rss_mb")}}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
    Path(output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
