#!/usr/bin/env bash
# The first arm of `make experiment` (no AAT, seed 0) with and without the C++ kernels, side by side.
#
#   bash bench/first_arm.sh [STEPS] [EXPERIMENT_DIR]        # default: 100 steps, runs/experiment
#
# Runs the arm's exact training command (as trainer/experiment.py builds it: the experiment's data and cached warm
# start, 400-step schedule) twice at the same moment, one process per core: the pure-PyTorch path
# (PAIF_NO_CPP=1, before the C++ kernels) and the default path. `stop_at_step=STEPS` ends both early on the same
# schedule; STEPS=400 also evaluates each checkpoint as the arm does (paif + strong, eps sweep). Needs a finished
# warm start (run `make experiment` until its first arm starts). Prints one JSON object: wall seconds per variant
# and their ratio. Run folders go to a temporary directory, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-100}
EXP=${2:-runs/experiment}
PY=${PY:-.venv/bin/python}
START=$(ls "$EXP"/cache/start-*.pt 2>/dev/null | head -1)
[ -n "$START" ] || { echo "error: no warm start under $EXP/cache; run make experiment first" >&2; exit 2; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore

arm() {  # arm VARIANT: train (and at 400 steps evaluate) into $TMP/VARIANT, write $TMP/VARIANT.json
    local v=$1 out=$TMP/$1 t0 t1 t2
    mkdir -p "$out"
    t0=$(date +%s.%N)
    $PY trainer/retrain.py --genotype paif mode=clean seed=0 channels=16 data.root="$EXP/data" \
        runs_root="$out/train" run_name=no-aat-s0 progress_bar=false num_threads=1 init_from="$START" \
        max_steps=400 data.batch_size=8 optim.lr=0.0005 optim.warmup_steps=30 attack.kind=fgsm aat.meta_iters=1 \
        data.val_limit=8 val.attack_steps=1 val.num_images=0 save_every_steps=50 log_every_steps=25 \
        stop_at_step="$STEPS" > "$out/retrain.json" 2> "$out/retrain.log"
    t1=$(date +%s.%N)
    t2=$t1
    if [ "$STEPS" -ge 400 ]; then
        $PY trainer/evaluate.py --checkpoint "$(ls "$out"/train/*/last.pt)" --data "$EXP/data" --split test \
            --threat paif --threat strong --out "$out/eval" --batch-size 6 --device cpu --seed 0 --no-progress \
            --eps-sweep 0 2 4 8 16 'sweep_threats=["paif"]' num_threads=1 > "$out/eval.out" 2> "$out/eval.log"
        t2=$(date +%s.%N)
    fi
    echo "{\"t0\": $t0, \"t1\": $t1, \"t2\": $t2}" > "$TMP/$v.json"
}

(export PAIF_NO_CPP=1; arm torch) &
arm cpp &
wait
$PY - "$TMP" "$STEPS" <<'EOF'
import json, sys
tmp, steps = sys.argv[1], int(sys.argv[2])
t = {v: json.load(open(f"{tmp}/{v}.json")) for v in ("torch", "cpp")}
r = {v: {"train_s": round(x["t1"] - x["t0"], 2), "eval_s": round(x["t2"] - x["t1"], 2)} for v, x in t.items()}
out = {"bench": "first_arm", "steps": steps, "evaluated": steps >= 400, "clock": "wall, both variants at once",
       "torch_path": r["torch"], "cpp_kernels": r["cpp"],
       "train_ratio_torch_over_cpp": r["torch"]["train_s"] / r["cpp"]["train_s"]}
print(json.dumps(out, indent=1))
EOF
