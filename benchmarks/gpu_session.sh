#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (the device tool allows 10 minutes a command):
#
#     bash benchmarks/gpu_session.sh [STEP ...]    STEP: tests, splice, image_mix, transform (default: the first three)
#
# Installs this checkout without dependencies (the machine's own torch and triton stay), runs the kernels'
# tests on CUDA tensors, then the kernel benchmarks. Results go to the device tool's $OUT when it is set (so
# that they come back; commit them into benchmarks/results/ by hand), else to ./cmcaug-bench-results.
# Python runs with -P: nothing depends on the checkout root being on sys.path. A failing step does not
# stop the next one.
set -uo pipefail
PY=${PYTHON:-python3}
results=${OUT:-cmcaug-bench-results}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests splice image_mix)

$PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -P -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"

failed=()
for step in "${steps[@]}"; do
    echo "=== $step ==="
    case $step in
        tests) $PY -P -m pytest -q -n 4 -p no:cacheprovider tests/test_splice.py tests/test_plan.py \
                   tests/test_patch_gather.py tests/test_image_mix.py tests/test_timix.py ;;
        *) $PY -P -m cmcaug.benchmarks.run_all "$step" --out "$results" ;;
    esac || failed+=("$step")
done
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
