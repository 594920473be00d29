#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU (this is how they run on a lent one):
#
#   1. correctness: every method, dtype and layout through normlab.nn.functional against float64
#      torch on the GPU (tests/test_triton_gpu.py's GPU_CHECK), then torch.compile(fullgraph=True)
#      of a small CNN (both layouts) and a transformer block, aot_eager and inductor
#      (GPU_COMPILE_CHECK);
#   2. `normlab bench --device cuda`: the bf16 suite against torch eager and Liger-Kernel, the
#      same channel-norm cases as CUDA-graph replays (GPU time without host overhead), the fp32
#      quick subset, then the bf16 quick subset against torch.compile (which compiles each case
#      anew, so it gets the small subset and the time that is left).
#
# Usage: bash benchmarks/gpu.sh OUTDIR     (from the repository root)
#   PYTHON      the interpreter with a CUDA build of torch and triton (default python3)
#   WHEELS      a folder of extra wheels to install first, e.g. liger-kernel (default .whl)
#   NORMLAB_GIT_COMMIT  the commit of this tree, recorded in the results instead of what git
#                       says (a copied tree's .git need not match its files)
# Each step has its own time limit; the log of everything is OUTDIR/gpu.log.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUTDIR}
py=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
mkdir -p "$out"
exec > >(tee "$out/gpu.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET NORMLAB_BACKEND
day=$(date +%F)

step() {
    local limit=$1
    shift
    echo "== $(date +%T) (${SECONDS} s) $*"
    timeout "$limit" "$@"
    echo "== rc $? at ${SECONDS} s"
}

if compgen -G "$wheels/*.whl" > /dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/normlab-site "$wheels"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/normlab-site"
fi
nvidia-smi -L
$py -c "import sys, torch, triton, numpy; print(sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name(0))"
$py -c "import liger_kernel; print('liger-kernel importable')" || echo "liger-kernel: not installed"

check='import sys; sys.path.insert(0, "tests"); import test_triton_gpu as t; exec(t.'
step 240 $py -c "${check}GPU_CHECK)" cuda
step 200 $py -c "${check}GPU_COMPILE_CHECK)" tests

bench() { step "$1" $py -m normlab bench --device cuda --out "$out" "${@:2}"; }
bench 220 --dtype bfloat16 --peers eager,liger --repeat 5 --min-time 0.01 --tag "$day-bf16"
bench 120 --cuda-graphs --dtype bfloat16 --peers eager,liger --repeat 5 --min-time 0.01 \
    --cases '^(batch|group|instance)_norm|(layer|rms)_norm 32768x4096' --tag "$day-bf16-graphs"
bench 90 --dtype float32 --quick --peers eager,liger --repeat 5 --min-time 0.01 --tag "$day-fp32-quick"
bench "${COMPILE_LIMIT:-200}" --dtype bfloat16 --quick --peers compile --repeat 5 --min-time 0.01 \
    --tag "$day-bf16-compile-quick"
echo "== done at ${SECONDS} s"
