#!/usr/bin/env bash
# After (or between) the final runs of MODEL (results/tuned/final_runs.sh): score what is finished and copy the
# numbers into results/tuned/MODEL, then rebuild its report there. Resumable: each step skips finished work.
#   1. teacher-forced BLEU/ROUGE-L of the final runs' adapters (PLAN.md, 2026-12-02):
#      oloraplus rescore RUNS/final --metrics-mode teacher-forced --output RUNS/final-teacher-forced
#   2. the regime measures of their adapters: oloraplus analyze RUNS/final/* --output RUNS/analysis
#   3. copy (numbers only: no Alpaca text, no adapters) final/*/results.json and eval_losses.json,
#      final/runs.jsonl and trials.csv, final-teacher-forced/runs.jsonl, analysis/analysis.json (aggregates only)
#   4. oloraplus report results/tuned/MODEL --tuned  (report.md, comparisons.csv)
# Usage: results/tuned/collect_final.sh MODEL [STEPS]   (STEPS: any of "rescore analyze copy report", default all)
# One compute thread per process (beside the final runs' two workers it runs at nice 19 like them).
set -eu
MODEL=$1; STEPS=${2:-rescore analyze copy report}
MAIN=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=$MAIN/runs/tuned/$MODEL; OUT=$MAIN/results/tuned/$MODEL
OLORAPLUS="$MAIN/.venv/bin/python -m oloraplus"
export PYTHONPATH="$MAIN/src" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$MAIN"
finished=$(ls -d "$RUNS"/final/*/results.json 2>/dev/null | xargs -r -n1 dirname | sort)
[ -n "$finished" ] || { echo "no finished final run in $RUNS/final"; exit 1; }
case " $STEPS " in *" rescore "*)  # RESCORE_WORKERS copies side by side, each claiming runs (2 on a quiet 2-core CPU)
  for w in $(seq 1 "${RESCORE_WORKERS:-1}"); do
    $OLORAPLUS rescore "$RUNS/final" --metrics-mode teacher-forced --output "$RUNS/final-teacher-forced" &
    sleep 5
  done
  wait ;; esac
case " $STEPS " in *" analyze "*)
  # the whole set again (one model load; about half a minute per run): analysis.json is rewritten as one file
  $OLORAPLUS analyze $finished --output "$RUNS/analysis" ;; esac
case " $STEPS " in *" copy "*)
  for run in $finished; do
    mkdir -p "$OUT/final/$(basename "$run")"
    cp "$run/results.json" "$run/eval_losses.json" "$OUT/final/$(basename "$run")/"
  done
  cp "$RUNS/final/runs.jsonl" "$OUT/final/"
  [ -f "$RUNS/final/trials.csv" ] && cp "$RUNS/final/trials.csv" "$OUT/final/"
  [ -f "$RUNS/final-teacher-forced/runs.jsonl" ] && mkdir -p "$OUT/final-teacher-forced" \
    && cp "$RUNS/final-teacher-forced/runs.jsonl" "$OUT/final-teacher-forced/"
  if [ -f "$RUNS/analysis/analysis.json" ]; then  # the per-run aggregates the report reads, without the per-layer rows
    mkdir -p "$OUT/analysis"
    "$MAIN/.venv/bin/python" -c 'import json, sys
data = json.load(open(sys.argv[1]))
data["runs"] = [{k: v for k, v in e.items() if k != "layers"} for e in data["runs"] if e]
data["note"] = "per-layer rows dropped: oloraplus analyze of the run folders gives them"
json.dump(data, open(sys.argv[2], "w"), indent=1)' "$RUNS/analysis/analysis.json" "$OUT/analysis/analysis.json"
  fi
  ;; esac
case " $STEPS " in *" report "*)
  $OLORAPLUS report "$OUT" --tuned ;; esac
