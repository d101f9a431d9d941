#!/usr/bin/env bash
# Keep the final runs of MODEL safe while they go: every INTERVAL seconds (default 300), copy each newly
# finished run's numbers into results/tuned/MODEL (collect_final.sh's copy step: results.json,
# eval_losses.json, runs.jsonl; no Alpaca text, no adapters) and commit only that folder.
#   setsid results/tuned/save_finished.sh smollm2-135m > /tmp/save.log 2>&1 &
# Why: runs/ is ignored, and a machine that is shut down mid-session takes it along (session 21 lost seed 4's
# six finished runs that way); a commit on main survives. Stops by itself once no final-run process is left
# (the pid files /tmp/final-*.pid of final_runs.sh), after a last copy.
set -u
MODEL=$1; INTERVAL=${2:-300}
MAIN=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=$MAIN/runs/tuned/$MODEL/final; OUT=results/tuned/$MODEL
cd "$MAIN"
save() {
  local new=0 run
  for run in "$RUNS"/*/results.json; do
    [ -f "$run" ] || continue
    cmp -s "$run" "$OUT/final/$(basename "$(dirname "$run")")/results.json" || new=1
  done
  [ "$new" = 1 ] || return 0
  "$(dirname "$0")/collect_final.sh" "$MODEL" copy >/dev/null || return 1
  git add "$OUT/final" "$OUT/final-teacher-forced" 2>/dev/null
  git commit -q -m "results/tuned/$MODEL: finished final runs saved as they finish (save_finished.sh)" \
    -- "$OUT/final" "$OUT/final-teacher-forced" && echo "$(date -u +%H:%M) saved: $(git log -1 --format=%h)"
}
while :; do
  alive=0
  for pidfile in /tmp/final-*.pid; do [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && alive=1; done
  save
  [ "$alive" = 1 ] || break
  sleep "$INTERVAL"
done
