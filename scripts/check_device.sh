#!/usr/bin/env bash
# The CUDA/bfloat16 check, run once on a machine with a GPU (CI has none):
#
#     bash scripts/check_device.sh            # the chain on the embedded demo model
#     PERP_STUDY=1 bash scripts/check_device.sh   # and `bench/reproduce.py --study methods`
#
# Every command goes through the CLI exactly as a user types it, on --device "$DEVICE", in
# bfloat16 and float32: prune (Wanda, SparseGPT 2:4, RIA 2:4 + permute, OWL + DSnoT),
# retrain (norms, MaskLoRA), merge, reconstruct (sublayer), shrink (width, depth),
# inspect (the sparsity and pattern promised) and eval. Prints one PASS/FAIL line per
# step and exits 1 if any failed. Needs no network: the demo model and texts ship with
# the package; the study needs ../shared (or $PERP_SHARED).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
MODEL=perp_cli/demo/model
TEXT=perp_cli/demo/corpus.txt
DEVICE=${PERP_DEVICE:-cuda}  # PERP_DEVICE=cpu tries the script here first
failed=0

python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

step() {  # step NAME perp-arguments...
    local name=$1; shift
    local start=$SECONDS
    if python3 -m perp_cli "$@" >"$WORK/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - start)) s)"
    else
        echo "FAIL $name ($((SECONDS - start)) s): $(tail -n 3 "$WORK/$name.log" | tr '\n' ' ')"
        failed=1
    fi
}

if [ "${PERP_STUDY:-0}" = 1 ]; then
    # One process per row of the methods study (rows share no cell), beside the chain.
    rows=$(python3 -c "import sys; sys.path.insert(0, 'bench'); import reproduce; print(' '.join(reproduce.METHOD_VARIANTS))")
    for row in $rows; do
        XDG_CACHE_HOME=$WORK/cache OMP_NUM_THREADS=1 timeout "${PERP_STUDY_SECONDS:-400}" \
            python3 bench/reproduce.py --study methods --methods "$row" --quiet >"$WORK/study-$row.log" 2>&1 &
    done
fi

for dtype in ${PERP_DTYPES:-bfloat16 float32}; do
    d=$WORK/$dtype
    on=(--device "$DEVICE" --dtype "$dtype" --quiet)
    calib=(--calib "$TEXT" --nsamples 16 --seqlen 128)
    step "$dtype-prune-wanda" prune "$MODEL" -o "$d/wanda" --method wanda --sparsity 0.5 "${calib[@]}" "${on[@]}"
    step "$dtype-prune-sparsegpt" prune "$MODEL" -o "$d/sgpt" --method sparsegpt --pattern 2:4 "${calib[@]}" "${on[@]}"
    step "$dtype-prune-ria-permute" prune "$MODEL" -o "$d/ria" --method ria --pattern 2:4 --permute "${calib[@]}" "${on[@]}"
    step "$dtype-prune-owl-dsnot" prune "$MODEL" -o "$d/owl" --method wanda --sparsity 0.6 --allocation owl --refine dsnot "${calib[@]}" "${on[@]}"
    step "$dtype-inspect-ria" inspect "$d/ria" --expect-pattern 2:4
    step "$dtype-retrain" retrain "$d/sgpt" -o "$d/retrained" --train norms --adapter masklora --data "$TEXT" --seqlen 128 --steps 20 "${on[@]}"
    step "$dtype-merge" merge "$d/retrained" -o "$d/merged" --device "$DEVICE" --quiet
    step "$dtype-inspect-merged" inspect "$d/merged" --expect-pattern 2:4
    step "$dtype-reconstruct-sublayer" reconstruct "$d/wanda" -o "$d/rec" --dense "$MODEL" --granularity sublayer --train norms "${calib[@]}" --steps-per-block 10 "${on[@]}"
    step "$dtype-inspect-reconstructed" inspect "$d/rec" --expect-sparsity 0.5
    step "$dtype-shrink-width" shrink "$MODEL" -o "$d/width" --structure width --remove-ratio 0.25 "${calib[@]}" "${on[@]}"
    step "$dtype-shrink-depth" shrink "$MODEL" -o "$d/depth" --structure depth --remove-blocks 1 "${calib[@]}" "${on[@]}"
    step "$dtype-eval" eval "$MODEL" "$d/merged" "$d/rec" "$d/width" --dataset "$TEXT" --seqlen 128 --max-windows 8 --device "$DEVICE" --dtype "$dtype" --json
    cp "$WORK/$dtype-eval.log" "$OUT/eval-$dtype.json" 2>/dev/null
done

if [ "${PERP_STUDY:-0}" = 1 ]; then
    wait
    tail -n 2 "$WORK"/study-*.log
    XDG_CACHE_HOME=$WORK/cache python3 bench/reproduce.py --study methods --report-only --out "$OUT/study" >"$OUT/study-report.log" 2>&1 || failed=1
fi
exit $failed
