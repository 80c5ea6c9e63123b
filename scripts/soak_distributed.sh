#!/bin/bash
# Run the distributed tests (torchrun, 2-4 gloo ranks) N times and count the runs that fail:
#   bash scripts/soak_distributed.sh 20        (about 90 s a run on 2 cores)
# Each run's log is kept in ${SOAK_DIR:-runs/soak_distributed}/run_K.log. Exit status 1 if any failed.
set -u
n=${1:-20}
dir=${SOAK_DIR:-runs/soak_distributed}
mkdir -p "$dir"
fails=0
for k in $(seq 1 "$n"); do
  if .venv/bin/python -m pytest -q -p no:cacheprovider tests/train/test_expert_parallel.py tests/train/test_distributed.py \
      > "$dir/run_$k.log" 2>&1; then
    echo "run $k/$n: passed ($(tail -1 "$dir/run_$k.log"))"
  else
    fails=$((fails + 1))
    echo "run $k/$n: FAILED, see $dir/run_$k.log"
  fi
done
echo "$((n - fails)) of $n runs passed"
[ "$fails" -eq 0 ]
