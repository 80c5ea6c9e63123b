#!/usr/bin/env bash
# The GPU check (under 10 minutes on one modern GPU): the tests marked `gpu`, the bench's
# grouped kernel vs dense on CUDA, and a 300-step ViT-S/16 MoE run on a generated folder of real
# JPEGs; writes runs/gpu_check/summary.json. Run it whenever a CUDA machine is available and
# put the numbers in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
"$PY" - <<'PY' > "$OUT/device.json"
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available(),
                  "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))
PY
cat "$OUT/device.json"
timeout 240 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider > "$OUT/tests.log" 2>&1; TESTS=$?
tail -3 "$OUT/tests.log"
timeout 120 "$PY" -m visionmoe bench --device cuda --quick --out "$OUT/bench" > "$OUT/bench.log" 2>&1; BENCH=$?
tail -15 "$OUT/bench.log"
[ -d "$OUT/photos" ] || "$PY" -c "from visionmoe.data import make_photo_folder; make_photo_folder('$OUT/photos', per_class=60, val_per_class=10)"
timeout 300 "$PY" -m visionmoe train configs/paper/vmoe_s16_imagenet.yaml data.args.root="$OUT/photos/train" \
    data.args.test_root="$OUT/photos/val" data.batch_size=64 data.workers=8 schedule.max_steps=300 \
    schedule.warmup_epochs=1 run.device=cuda run.eval_every_epochs=1000 run.checkpoint_every=300 run.progress=false \
    --run-dir "$OUT/train" > "$OUT/train.log" 2>&1; TRAIN=$?
tail -5 "$OUT/train.log"
"$PY" - "$OUT" "$TESTS" "$BENCH" "$TRAIN" <<'PY'
import json, pathlib, sys
out, tests, bench, train = sys.argv[1], *map(int, sys.argv[2:])
o = pathlib.Path(out)
s = {"device": json.loads((o / "device.json").read_text()), "tests_rc": tests, "bench_rc": bench, "train_rc": train,
     "tests_tail": (o / "tests.log").read_text().splitlines()[-1:] if (o / "tests.log").exists() else []}
for name, path in (("bench", o / "bench" / "bench.json"), ("train", o / "train" / "summary.json")):
    if path.exists():
        s[name] = json.loads(path.read_text())
(o / "summary.json").write_text(json.dumps(s, indent=2))
print(json.dumps({k: v for k, v in s.items() if k not in ("bench",)}, indent=2)[:4000])
PY
