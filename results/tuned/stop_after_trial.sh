#!/usr/bin/env bash
# Stop one running study loop (results/tuned/loop.sh) right after its current trial completes, so that a
# stop loses no trial's work: waits until the number of COMPLETE trials of the loop's two studies grows,
# then kills the loop's process group. The loop must run in its own session, started as
#   setsid bash -c 'echo $$ > /tmp/loop-lora.pid; exec nice -n 19 results/tuned/loop.sh WT MODEL lora lora-plus' \
#     > /tmp/loop-lora.log 2>&1 &
# Usage: stop_after_trial.sh PIDFILE DB ONE PLUS     (e.g. /tmp/loop-lora.pid /work/study-db/smollm2-135m.db lora lora-plus)
set -u
PGID=$(cat "$1"); DB=$2; ONE=$3; PLUS=$4
complete() {
  sqlite3 "$DB" "select count(*) from trials t join studies s using(study_id) where t.state = 'COMPLETE'
                 and (s.study_name like '%.$ONE' or s.study_name like '%.$PLUS')"
}
n0=$(complete)
while [ "$(complete)" -le "$n0" ]; do
  kill -0 "$PGID" 2>/dev/null || { echo "the loop ($PGID) is not running"; exit 1; }
  sleep 5
done
kill -- "-$PGID" && echo "stopped the $ONE / $PLUS loop after its trial completed ($(complete) complete)"
