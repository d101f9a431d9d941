#!/usr/bin/env bash
# Keep a running study of MODEL safe: every INTERVAL seconds (default 300), commit what has finished to main,
# committing only results/tuned/MODEL (never other work in the checkout):
#   - the study database DB (default /work/study-db/MODEL.db), copied with SQLite's online backup (a consistent
#     copy while workers write) to results/tuned/MODEL/optuna.db, when it has a trial more than the copy;
#   - the finished final runs' numbers (collect_final.sh's copy step: results.json, eval_losses.json,
#     runs.jsonl, the rescores' runs.jsonl; no Alpaca text, no adapters), after their teacher-forced rescore
#     (collect_final.sh's rescore step, as each run finishes; RESCORE=0 leaves it out).
#   setsid results/tuned/save_progress.sh gemma3-270m > /tmp/save.log 2>&1 &
# Why: runs/ and the database are outside git, and a machine that is shut down mid-session takes them along
# (session 21 lost seed 4's six finished runs and every final adapter that way); a commit on main survives.
# Stops by itself, after a last save, once no process of the pid files /tmp/loop-*.pid (loop.sh) and
# /tmp/final-*.pid (final_runs.sh) is alive.
set -u
MODEL=$1; INTERVAL=${2:-300}
MAIN=$(cd "$(dirname "$0")/../.." && pwd)
DB=${DB:-/work/study-db/$MODEL.db}
RUNS=$MAIN/runs/tuned/$MODEL/final; OUT=results/tuned/$MODEL
cd "$MAIN"
PY=$MAIN/.venv/bin/python

changed_db() {  # 0 when DB has more finished trials than the committed copy
  [ -f "$DB" ] || return 1
  "$PY" - "$DB" "$OUT/optuna.db" <<'EOF'
import os, sqlite3, sys
def done(path):
    if not os.path.exists(path):
        return -1
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        return con.execute("select count(*) from trials where state in ('COMPLETE', 'PRUNED')").fetchone()[0]
sys.exit(0 if done(sys.argv[1]) > done(sys.argv[2]) else 1)
EOF
}

backup_db() {
  mkdir -p "$OUT"
  "$PY" -c 'import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2] + ".tmp")
src.backup(dst); dst.close(); src.close()' "$DB" "$OUT/optuna.db" && mv "$OUT/optuna.db.tmp" "$OUT/optuna.db"
}

changed_runs() {
  local run
  for run in "$RUNS"/*/results.json; do
    [ -f "$run" ] || continue
    cmp -s "$run" "$OUT/final/$(basename "$(dirname "$run")")/results.json" || return 0
  done
  return 1
}

save() {
  local paths=()
  if changed_db; then backup_db && paths+=("$OUT/optuna.db"); fi
  # a newly finished final run is scored teacher-forced at once (its adapter lives in runs/ only), then copied
  if changed_runs && { [ "${RESCORE:-1}" = 0 ] || "$(dirname "$0")/collect_final.sh" "$MODEL" rescore >/dev/null 2>&1 || true; } \
     && "$(dirname "$0")/collect_final.sh" "$MODEL" copy >/dev/null; then
    paths+=("$OUT/final")
    [ -d "$OUT/final-teacher-forced" ] && paths+=("$OUT/final-teacher-forced")
  fi
  [ ${#paths[@]} -gt 0 ] || return 0
  git add -- "${paths[@]}" && git commit -q -m "results/tuned/$MODEL: progress saved as it finishes (save_progress.sh)" \
    -- "${paths[@]}" && echo "$(date -u +%H:%M) saved ${paths[*]}: $(git log -1 --format=%h)"
}

while :; do
  alive=0
  for pidfile in /tmp/loop-*.pid /tmp/final-*.pid; do
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && alive=1
  done
  save
  [ "$alive" = 1 ] || break
  sleep "$INTERVAL"
done
