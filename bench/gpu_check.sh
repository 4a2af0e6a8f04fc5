#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine where nothing can be installed: the
# environment, the kernel and model tests compiled on the GPU, the kernel bench against fp16 and
# peers, the launch-configuration sweep and the end-to-end decode bench. Logs and JSON go to $OUT.
#
#   STEPS=env,lookup,tests,kernels,sweep,dispatch,int8,eager,e2e,peers bash bench/gpu_check.sh
#   (KERNEL_ROWS / KERNEL_NAMES / KERNEL_ARGS / SWEEP_ARGS pass --rows, --names (names may hold
#   spaces: "aqlm 2x8"), other options, --quick to the benches,
#   KERNEL_TIMEOUT bounds the kernel bench;
#   TEST_ARGS, e.g. "-m gpu", selects tests, TEST_TIMEOUT bounds them; EAGER_NAMES picks the eager rows;
#   E2E_ARGS, e.g. --compile, and E2E_TIMEOUT go to the end-to-end step, E2E_GRAPHS=0 runs its
#   decode steps eagerly; LOOKUP_SHAPES and LOOKUP_ARGS, e.g. "--m 1", to the lookup step, whose
#   compiles LOOKUP_WARM_TIMEOUT bounds)
#
# Peers (bitsandbytes, gemlite) are read from .whl/site when present (unpacked wheels; see
# docs/performance.md). Each step has its own time limit, so one that hangs leaves the rest.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
OUT=${OUT:-/tmp/lowbit-gpu}
mkdir -p "$OUT"
STEPS=${STEPS:-env,lookup,tests,kernels,sweep,dispatch,e2e,peers}
step() { [[ ",$STEPS," == *",$1,"* ]] && echo "=== $1 $(date +%T)"; }

if step env; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name(),
torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
fi

if step lookup; then  # NF4 / AQLM table lookups: compile in one process per shape at once, then time
    SHAPES=${LOOKUP_SHAPES:-4096x4096,4096x11008,8192x8192}
    for s in ${SHAPES//,/ }; do
        timeout ${LOOKUP_WARM_TIMEOUT:-240} python3 bench/lookup.py --shapes "$s" --warm ${LOOKUP_ARGS:-} >"/tmp/lookup_warm_$s.log" 2>&1 &
    done
    wait
    cat /tmp/lookup_warm_*.log | grep -v Warning | tail -8
    timeout ${LOOKUP_TIMEOUT:-360} python3 bench/lookup.py --shapes "$SHAPES" --json "$OUT/lookup.json" ${LOOKUP_ARGS:-} \
        >"$OUT/lookup.log" 2>&1
    echo "lookup exit $?"
    grep "^|" "$OUT/lookup.log" | cut -c1-110
fi

if step tests; then
    # -v names each test as it ends, so a step cut short by its time limit still names its failures
    timeout ${TEST_TIMEOUT:-120} python3 -m pytest -v -p no:cacheprovider -n 8 ${TEST_ARGS:-} \
        tests/test_triton_int_grouped.py tests/test_triton_blockwise4.py tests/test_triton_codebook.py tests/test_triton_int8.py \
        tests/test_gpu_paths.py tests/test_ops.py tests/test_launch_cache.py tests/test_held_calls.py tests/test_held_calls_launches.py \
        tests/test_eager_work.py tests/test_prmt.py \
        tests/test_split_k.py \
        tests/test_gptq.py::test_gptq_on_gpu_matches_cpu \
        tests/test_memory_bounded.py::test_gpu_working_memory_does_not_grow_with_depth \
        >"$OUT/tests.log" 2>&1
    echo "pytest exit $?"
    grep -E "(FAILED|ERROR) tests/|passed|failed" "$OUT/tests.log" | grep -v " PASSED " | tail -15
    # whatever TEST_ARGS selects: the held launches' arguments against this machine's own Triton
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_direct_launch.py 2>&1 | tail -3
fi

if step kernels; then
    timeout ${KERNEL_TIMEOUT:-150} python3 bench/kernels.py --rows ${KERNEL_ROWS:-fp16,lowbit,tinygemm,bitsandbytes,probe} \
        ${KERNEL_NAMES:+--names "$KERNEL_NAMES"} ${KERNEL_ARGS:-} --json "$OUT/kernels.json" >"$OUT/kernels.log" 2>&1
    echo "kernels exit $?"
    tail -80 "$OUT/kernels.log"
fi

if step sweep; then
    for i in $(seq 0 13); do
        timeout 100 python3 bench/sweep.py ${SWEEP_ARGS:-} --warm "$i/14" >"/tmp/warm$i.log" 2>&1 &
    done
    wait
    grep -l -i "error\|Traceback" /tmp/warm*.log | head -3 | xargs -r tail -5
    timeout 120 python3 bench/sweep.py ${SWEEP_ARGS:-} --json "$OUT/sweep.json" 2>&1 | tail -20
fi

if step dispatch; then  # where an eager call's time goes (Triton's launch floor, cProfile per call)
    timeout 90 python3 bench/dispatch.py --gpu >"$OUT/dispatch.log" 2>&1
    echo "dispatch exit $?"
    grep -E "^\|" "$OUT/dispatch.log"
fi

if step int8; then  # LLM.int8's variants (weight-only, prequantized x) against fp16 and torch._int_mm
    timeout ${INT8_TIMEOUT:-150} python3 bench/kernels.py --rows fp16,lowbit,int_mm --names int8,fp16 \
        --shapes 4096x4096,4096x11008 --m 1,16,128,512,2048 --no-dequantize --json "$OUT/int8.json" \
        >"$OUT/int8.log" 2>&1
    echo "int8 exit $?"
    grep "^|" "$OUT/int8.log"
fi

if step eager; then  # one-token calls, eager and in a graph: without the launch cache, with it through
    # Triton's runner, and with it calling Triton's C launcher directly (the default)
    for setting in "0 1" "1 0" "1 1"; do
        set -- $setting
        LOWBIT_LAUNCH_CACHE=$1 LOWBIT_DIRECT_LAUNCH=$2 timeout ${EAGER_TIMEOUT:-90} python3 bench/kernels.py \
            --rows fp16,lowbit --names "${EAGER_NAMES:-fp16,w4g128,nf4 double-quant}" --shapes 4096x4096,4096x11008 \
            --m 1 --no-dequantize >"$OUT/eager$1$2.log" 2>&1
        echo "eager (LOWBIT_LAUNCH_CACHE=$1 LOWBIT_DIRECT_LAUNCH=$2) exit $?"
        grep "^|" "$OUT/eager$1$2.log"
    done
fi

if step e2e; then
    graphs=--graphs; [[ ${E2E_GRAPHS:-1} == 0 ]] && graphs=
    timeout ${E2E_TIMEOUT:-150} python3 bench/e2e.py --model llama7b --layers 8 $graphs --fuse ${E2E_ARGS:-} 2>&1 | tail -12
fi

if step peers; then  # gemlite may autotune shapes its shipped tuning lacks: last, on its own limit
    timeout 60 python3 bench/kernels.py --rows fp16,gemlite --no-eager --json "$OUT/gemlite.json" \
        >"$OUT/gemlite.log" 2>&1
    echo "gemlite exit $?"
    tail -30 "$OUT/gemlite.log"
fi
