#!/usr/bin/env bash
# The GPU checks in one call, within a time budget: the gpu-marked tests and the GPU step
# benchmark (4 × 1024 and 8 × 1024 tokens), for a machine with one CUDA GPU that may have no
# network. Everything it writes goes to OUT: the benchmark's step_cuda*.json / .md and profiles,
# the test report, and log.txt; results.tar.gz holds them all.
#
#   bench/gpu_check.sh OUT [WHEELS] [TINY]
#
#   OUT     output folder (created)
#   WHEELS  optional folder of wheels installed with --no-deps into a private target first
#           (packages the machine lacks: deepspeed, datasets, the pinned transformers, ...)
#   TINY    optional folder made by tests._train_helpers.make_tiny_run_inputs (the end-to-end
#           GPU test needs SmolLM2's tokenizer, which a machine without network cannot fetch)
#
# Environment: BUDGET_S (seconds for the whole script, default 540), TEST_S (cap of the tests,
# default 120), BENCH_FLAGS (extra flags of every benchmark call, e.g. "--quick --device cpu"
# for a dry run on a CPU machine), PYTHON (default python3).
# Each phase gets what is left of the budget (a phase stopped at its limit keeps the rows it
# wrote); the exit status is the first failing phase's.
set -uo pipefail

out=${1:?usage: bench/gpu_check.sh OUT [WHEELS] [TINY]}
wheels=${2:-}
tiny=${3:-}
budget=${BUDGET_S:-540}
test_cap=${TEST_S:-120}
py=${PYTHON:-python3}
start=$(date +%s)
status=0
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1

left() { echo $((budget - ($(date +%s) - start))); }
phase() {  # phase NAME CAP_S CMD...: run CMD for at most min(CAP_S, what is left) seconds
    local name=$1 cap=$2 limit rc
    shift 2
    limit=$(left)
    ((cap < limit)) && limit=$cap
    if ((limit < 20)); then
        echo "== $name: skipped, ${limit}s of the budget left"
        return
    fi
    echo "== $name (at most ${limit}s, $(($(date +%s) - start))s elapsed)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc ($(($(date +%s) - start))s elapsed)"
    ((rc != 0 && status == 0)) && status=$rc
}

if [[ -n $wheels ]]; then
    site=$(mktemp -d)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[[ -n $tiny ]] && export HMORA_TINY_RUN_INPUTS=$tiny
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
"$py" - <<'EOF'
import importlib.metadata as md, platform
names = "torch transformers deepspeed peft datasets accelerate tokenizers triton".split()
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
print("python", platform.python_version(), *(f"{n} {version(n)}" for n in names))
EOF

read -ra flags <<<"${BENCH_FLAGS:-}"
bench=("$py" -m hmora_ds.bench step --device cuda --out "$out" "${flags[@]}")

phase "gpu tests" "$test_cap" "$py" -m pytest -m gpu -p no:cacheprovider -q -rs \
    --junitxml="$out/gpu_tests.xml" tests/test_gpu.py

# The rows that carry the targets first; the rest as time allows.
rows_4k="frozen base,LoRA r=64,HMoRA w LW,LoRA r=64 compiled,HMoRA w LW compiled"
rows_4k+=",HMoRA w/o LW,HMoRA w/o LW compiled,LoRA r=8,PEFT LoRA r=8,PEFT LoRA r=64"
rows_4k+=",MoLoRA,MixLoRA,HydraLoRA,HiMoLE,LoRAMoE,MoELoRA,AdaMoLE,MoLA-▽ (2-4-6-8)"
rows_4k+=",HMoRA e=16 dense,HMoRA e=16 sparse,HMoRA e=32 dense,HMoRA e=32 sparse"
rows_8k="LoRA r=64,HMoRA w LW,LoRA r=64 compiled,HMoRA w LW compiled,frozen base"
# Leave the 8 × 1024 rows about a third of what is left after the 4 × 1024 ones.
phase "bench 4x1024" $(($(left) * 2 / 3)) "${bench[@]}" --steps 6 --warmup 2 --only "$rows_4k" \
    --profile "HMoRA w LW compiled,LoRA r=64 compiled,HMoRA e=32 sparse"
phase "bench 8x1024" "$(left)" "${bench[@]}" --batch 8 --seq 1024 --steps 6 --warmup 2 --only "$rows_8k"

tar -czf "$out/results.tar.gz" -C "$out" --exclude=results.tar.gz . 2>/dev/null
echo "== done in $(($(date +%s) - start))s, status $status"
exit $status
