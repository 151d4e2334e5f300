#!/usr/bin/env bash
# `make demo`: the whole PAIF pipeline on the embedded synthetic dataset, in a few minutes on a 2-core CPU.
#
#   1 data      python -m rgbt.synthetic  -> data/synthetic (200 train / 16 val / 16 test, 96x128)
#   2 search    python -m strategies.nni_local create --config search.yml   (nnictl, 2 robust DARTS trials)
#   3 derive    derive/export_genotype.py --experiment: the finished trial with the lowest held-out
#               adversarial loss (strategies/selection.py)
#   4 warm      python -m trainer.warmstart: SegFormer pretrained on max-rule fused images (started beside the
#               search: it does not depend on the genotype, and the search leaves one core idle) + the derived
#               fusion net fitted to the max-rule image (cached under runs/cache by content hash: a rerun reuses it)
#   5 retrain   trainer/retrain.py --config configs/demo_retrain.yaml init_from=<warm start>  (AAT)
#   6 evaluate  trainer/evaluate.py --threat paif --threat strong            (full attack step counts,
#               first DEMO_LIMIT test images, eps sweep of paif only)
#
# Stages 1-3 run two single-threaded processes side by side (the search, the segmenter pretraining); stages 4-6
# run one process at a time, which takes DEMO_THREADS torch threads (both cores: the evaluation 1.7x faster).
#
# Every run writes into a fresh folder runs/demo/demo-<time>/ (runs/demo/latest points at it); the NNI
# experiment itself lands in runs/nni-experiments/<id>/ (search.yml). Environment knobs:
#   DEMO_LIMIT=8          test images evaluated       OMP_NUM_THREADS=1   torch threads per process, stages 1-3
#   DEMO_RUNS=runs/demo   parent of the run folders   DEMO_SEARCH_TIMEOUT=480   seconds before the search is stopped
#   DEMO_CACHE=runs/cache warm-start cache            DEMO_SEG_STEPS=700   segmenter pretraining steps (batch 4)
#   DEMO_THREADS=2        torch threads of stages 4-6 (one process at a time)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
[[ $VENV = /* ]] || VENV=$ROOT/$VENV
export PATH="$VENV/bin:$PATH"   # nnictl's trialCommand `python` must be the project's interpreter
# One thread per process: on 2 shared cores, torch's default 2 OpenMP threads slow down ~10x as soon as
# another process competes for the CPU (measured: a 2-batch search epoch took 218 s instead of 17 s).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}   # NNI's "not a nn.Module" noise on every import

DATA=data/synthetic
LIMIT=${DEMO_LIMIT:-8}
RUNS=${DEMO_RUNS:-runs/demo}
SEARCH_TIMEOUT=${DEMO_SEARCH_TIMEOUT:-480}
SEG_STEPS=${DEMO_SEG_STEPS:-700}
THREADS=${DEMO_THREADS:-2}
# the segmenter pretraining recipe; both warmstart calls pass it, as it is part of the cache key. Batch 4 at lr 2e-3
# with the gradient clipped to norm 1, 700 steps: 53.8-55.5 % mIoU over 3 seeds on 64 held-out images, where the
# earlier 1,000 steps unclipped ranged 47-58 % by seed (README "How this recipe was found")
SEG_ARGS=(seg.steps="$SEG_STEPS" seg.batch_size=4 seg.lr=0.002 seg.clip_grad_norm=1.0)
CACHE=${DEMO_CACHE:-runs/cache}
RUN=$RUNS/demo-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUNS"
mkdir "$RUN"   # fails (stops the demo) rather than mixing two runs started within the same second
ln -sfn "$(basename "$RUN")" "$RUNS/latest"

TIMES=$RUN/stage_times.txt
T_ALL=$(date +%s)
stage() {  # stage N NAME: print a header and remember when the stage started
    STAGE_NAME=$2
    T_STAGE=$(date +%s)
    printf '\n==> [%s/6] %s   (%s)\n' "$1" "$2" "$(date +%H:%M:%S)"
}
done_stage() {
    local dt=$(( $(date +%s) - T_STAGE ))
    printf '%-9s %4d s\n' "$STAGE_NAME" "$dt" | tee -a "$TIMES"
}
# a failed stage also stops the background processes still running (segmenter pretraining, warm start)
trap 'rc=$?; [ -z "${SEG_PID:-}" ] || kill "$SEG_PID" 2>/dev/null || true
      [ -z "${WARM_PID:-}" ] || kill "$WARM_PID" 2>/dev/null || true
      [ $rc -eq 0 ] || echo "demo FAILED in stage ${STAGE_NAME:-setup} (exit $rc); logs in $RUN" >&2' EXIT

echo "PAIF demo -> $RUN  (OMP_NUM_THREADS=$OMP_NUM_THREADS)"

stage 1 data
python -m rgbt.synthetic --out "$DATA" --n-train 200 --n-val 16 --n-test 16 --size 96 128 --seed 0
python -m rgbt.summary "$DATA"
done_stage

# The segmenter pretraining does not depend on the genotype: it runs beside the search (one trial at a time, so
# one core is otherwise idle) and stage 4 waits for it.
python -m trainer.warmstart --data "$DATA" --cache "$CACHE" --segmenter-only progress_bar=false "${SEG_ARGS[@]}" \
    > "$RUN/segmenter.log" 2>&1 &
SEG_PID=$!

stage 2 search
# nnictl create --foreground, pinned to 127.0.0.1; exits non-zero unless every trial succeeded. nnictl's own
# lines are shown; the long summary JSON printed after them goes to search.json only.
python -m strategies.nni_local create --config search.yml --timeout "$SEARCH_TIMEOUT" \
    | tee "$RUN/search.json" | sed '/^{/,$d'
EXP=$(python -c 'import json,sys; t=open(sys.argv[1]).read(); t=t if t.startswith("{") else t[t.rindex("\n{")+1:]; print(json.loads(t)["experiment_dir"])' "$RUN/search.json")
done_stage

stage 3 derive
# the finished trial with the lowest held-out adversarial loss (selection metric; provenance in out.provenance.json)
python derive/export_genotype.py --experiment "$EXP" --out "$RUN/out.json"
done_stage

stage 4 warm
# fusion fit: 600 steps (~70 s on two threads on a machine of 1.9 s clean steps) left the searched 8-channel net at
# SSIM 1.285 / Qabf 0.374 on the val split and the segmenter at 57.3 % val mIoU on its output; 300 steps: 1.251 /
# 0.301 / 54.1 % (max rule: 58.5 %).
# The fit needs no segmenter: it starts at once, on one thread while the segmenter pretraining still runs on the
# other core, on both once that is done; the same process then waits for the segmenter's cache entry and writes the
# start checkpoint (--beside-segmenter: one process start instead of two; a failed pretraining stops both).
python -m trainer.warmstart --beside-segmenter --data "$DATA" --genotype "$RUN/out.json" --cache "$CACHE" \
    --json "$RUN/warmstart.json" progress_bar=false "${SEG_ARGS[@]}" fusion.steps=600 num_threads="$THREADS" &
WARM_PID=$!
wait "$SEG_PID" || { echo "segmenter pretraining failed:" >&2; tail -5 "$RUN/segmenter.log" >&2; exit 1; }
SEG_PID=
wait "$WARM_PID"
WARM_PID=
START=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["start"])' "$RUN/warmstart.json")
done_stage

stage 5 retrain
python trainer/retrain.py --genotype "$RUN/out.json" --config configs/demo_retrain.yaml runs_root="$RUN" \
    init_from="$START" num_threads="$THREADS" | tee "$RUN/retrain.json"
# the final checkpoint (last.pt), as make experiment evaluates its arms: best.pt is chosen on val, not the run's end
CKPT=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["last"])' "$RUN/retrain.json")
done_stage

stage 6 evaluate
# batches of 8 (the default DEMO_LIMIT's images in one): `strong` on 8 images took 161-163 s against 186-210 s in batches
# of 4 (two threads, the evaluation's own timing, quiet runs on one machine)
python trainer/evaluate.py --checkpoint "$CKPT" --data "$DATA" --split test --threat paif --threat strong \
    --limit "$LIMIT" --batch-size 8 --out "$RUN/eval" --no-progress 'sweep_threats=[paif]' num_threads="$THREADS"
done_stage

printf '%-9s %4d s\n' total $(( $(date +%s) - T_ALL )) | tee -a "$TIMES"
echo
python scripts/demo_summary.py "$RUN"   # -> $RUN/summary.md: the run's numbers against its targets, what to look at
echo
echo "report: $RUN/eval/report.md"
