#!/usr/bin/env bash
# run.threads under load: the Trainer's images/s on the dense and the MoE Fashion-MNIST recipes
# (STEPS steps each, default 30) at run.threads=auto, 1 and 2, first with the machine to
# itself, then with LOAD busy processes beside it (default 1). One run per cell: a rough
# picture, not a bench (docs/performance.md, "Threads under load").
#     bash benchmarks/threads_under_load.sh            # about 5 minutes on 2 cores
set -euo pipefail
STEPS=${STEPS:-30}
LOAD=${LOAD:-1}
V=${VISIONMOE:-visionmoe}
OUT=${OUT:-runs/threads_under_load}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
for load in 0 "$LOAD"; do
  pids=""
  for _ in $(seq 1 "$load"); do python3 -c "while True: pass" & pids="$pids $!"; done
  sleep 2
  for cfg in fmnist_vit_dense fmnist_vmoe_last2_top1; do
    for t in auto 1 2; do
      run="$OUT/$cfg-threads_$t-load_$load"
      "$V" train "configs/supervised/$cfg.yaml" schedule.max_steps="$STEPS" run.threads="$t" run.progress=false \
        run.eval_every_epochs=1e9 run.keep_checkpoints=1 --run-dir "$run" --overwrite > "$run.log" 2>&1
      ips=$(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['train_img_per_s']))" "$run/summary.json")
      picked=$(grep -o "[0-9]* intra-op thread(s)" "$run.log" | head -1 || true)
      echo "load=$load $cfg run.threads=$t: $ips images/s ${picked:+(auto: $picked)}"
    done
  done
  if [ -n "$pids" ]; then kill $pids; fi
done
