#!/usr/bin/env bash
# Every GPU measurement in one go, on a machine with one CUDA GPU.
#
#   bash bench/gpu_suite.sh [STEP ...]      STEP: env tests dequant train lora bgmv multi adamw fsdp recompute plan gguf (default: all, in this order)
#
# Run from the repository root. Needs torch with CUDA, triton, transformers and peft, plus
# bitsandbytes: if .whl/ holds wheels (for a machine without network), they are installed into
# /tmp/site first. minilora itself is installed in editable mode (`pip install -e .`, no network
# needed), as on any checkout. Fetch the wheel on a machine with network (.whl/ is git-ignored):
#   pip download bitsandbytes==0.50.2 --no-deps --only-binary :all: \
#       --platform manylinux_2_24_x86_64 --python-version 3.12 -d .whl/      (43 MB)
#   pip download gguf --no-deps --only-binary :all: -d .whl/                  (the gguf step)
# Without a GPU, `python -m bench.kernel_resources` shows what the kernels cost on sm_90a.
# All steps log to suite.log and put their JSON beside it in bench/results/gpu/; with $OUT set (a
# remote run, where few files come back) the log goes to $OUT and the JSON files into one
# $OUT/gpu_results.tar, rewritten after every step. Each step stops after GPU_SUITE_STEP_S seconds
# (default 170; 0: no limit), so one slow step cannot take the others' time. On an H200 all the
# steps take more than one 10-minute command (estimated from one partial run, not timed whole), so
# run them in two: `bash bench/gpu_suite.sh env tests dequant train lora bgmv multi adamw`, then
# `bash bench/gpu_suite.sh fsdp recompute plan gguf`.
#
# What each step answers (targets as in bench/README.md):
#   env      versions, and each Triton kernel's self-check against PyTorch on this GPU (exit 1 if one fails)
#   tests    pytest -m gpu tests: kernels, QLoRA layer vs PEFT, paged AdamW, the demo, on real hardware
#   dequant  bench.dequant: % of copy bandwidth and x bitsandbytes (targets >= 85%, >= 1.3x); the
#            fused matmul against bitsandbytes' dequantize + cuBLAS at 1..64 tokens
#   bgmv     bench.lora_bgmv: the mixed-adapter LoRA term, Triton shrink/expand (kernels/lora_bgmv.py)
#            against multi.py's PyTorch gather + bmm, decoding and prefill
#   multi    bench.multi_adapter --device cuda: 16 requests over 5 adapters on the 135M geometry in bf16,
#            against one adapter, the base and PEFT's mixed batch (targets >= 0.8x, <= 1.15x, >= 2x)
#   lora     bench.lora_layer --device cuda (target >= 1.3x PEFT + bitsandbytes, lower memory)
#   adamw    bench.adamw, whose CUDA run adds the oversubscribed paging case
#   train    bench.train_step --geometry gemma-3-1b (targets >= 1.5x tokens/s, <= 0.6x memory), with
#            --profile: ops and kernels a step and the GPU's busy share, for both sides
#   recompute bench.recompute on Gemma 3 1B geometry: step time and peak with recompute off,
#            selective (torch's selective activation checkpointing) and full, beside the planner's figures
#   plan     bench.plan_check: the planner's predicted peak vs torch.cuda.max_memory_allocated of a
#            real train.py run on Gemma 3 1B geometry (target: within 10%)
#   fsdp     1-GPU FSDP smoke: torchrun --nproc_per_node 1 train.py --parallel fsdp (NCCL, bf16, Triton)
#   gguf     tests/test_gguf.py with this machine's transformers and gguf: every family and GGUF type
#            exported, read back and validated
set -uo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-bench/results/gpu}
out=bench/results/gpu
[ -n "${OUT:-}" ] && out=$(mktemp -d)
mkdir -p "$log" "$out"
limit=${GPU_SUITE_STEP_S:-170}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_suite: installing the wheels in .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import minilora.models, minilora.kernels" 2>/dev/null \
    || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || { echo "gpu_suite: could not install minilora (pip install -e .)" >&2; exit 1; }
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_suite: no CUDA device is visible to torch; run this on a GPU machine." >&2; exit 2; }

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env tests dequant train lora bgmv multi adamw fsdp recompute plan gguf)
status=0
run() {  # run NAME COMMAND...: append to suite.log, remember a failure, go on with the next step
    local name=$1 start=$SECONDS; shift
    echo "=== $name: $*" | tee -a "$log/suite.log"
    if [ "$limit" -gt 0 ]; then timeout "$limit" "$@"; else "$@"; fi 2>&1 | tee -a "$log/suite.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "=== $name stopped after its ${limit} s (GPU_SUITE_STEP_S)" | tee -a "$log/suite.log"
    [ "$rc" -ne 0 ] && { echo "=== $name failed (exit $rc)" | tee -a "$log/suite.log"; status=1; }
    echo "=== $name: $((SECONDS - start)) s" | tee -a "$log/suite.log"
    return "$rc"
}
for step in "${steps[@]}"; do
    case $step in
        env) run env sh -c 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; python3 -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|peft|bitsandbytes) "; python3 -c "from minilora.kernels import dispatch; raise SystemExit(dispatch.main())"' ;;
        tests) run tests python3 -m pytest -q -m gpu tests ;;
        dequant) run dequant python3 -m bench.dequant --tokens 1,4,16,64 --out "$out/dequant.json" ;;
        bgmv) run bgmv python3 -m bench.lora_bgmv --out "$out/lora_bgmv.json" ;;
        multi) run multi python3 -m bench.multi_adapter --device cuda --dtype bfloat16 --out "$out/multi_adapter_cuda" ;;
        lora) run lora python3 -m bench.lora_layer --device cuda --rounds 1 --repeats 50 --out "$out/lora_layer_cuda.json" ;;
        adamw) run adamw python3 -m bench.adamw --device cuda --out "$out/adamw_cuda.json" ;;
        train) run train python3 -m bench.train_step --geometry gemma-3-1b --device cuda --rounds 2 --profile \
                   --ckpt /tmp/gemma-3-1b-random && cp bench/results/train_step_gemma-3-1b_cuda.json "$out/" ;;
        recompute) run recompute python3 -m bench.recompute --geometry gemma-3-1b --device cuda --seq 1024 --rounds 2 \
                   --ckpt /tmp/gemma-3-1b-random && cp bench/results/recompute_gemma-3-1b_cuda.json "$out/" ;;
        plan) run plan python3 -m bench.plan_check --geometry gemma-3-1b --device cuda --ckpt /tmp/gemma-3-1b-random \
                   && cp bench/results/plan_check_gemma-3-1b_cuda.json "$out/" ;;
        gguf) run gguf python3 -m pytest -q tests/test_gguf.py ;;
        fsdp) rm -rf /tmp/fsdp_smoke && run fsdp python3 -m torch.distributed.run --standalone --nproc_per_node 1 train.py \
                  --parallel fsdp --max-steps 30 --eval-generate 8 --out /tmp/fsdp_smoke \
                  && cp /tmp/fsdp_smoke/summary.json "$out/fsdp_smoke_summary.json" ;;
        *) echo "gpu_suite: unknown step '$step'; use env, tests, dequant, bgmv, multi, lora, adamw, train, recompute, plan, fsdp or gguf." >&2; status=2 ;;
    esac
    if [ -n "${OUT:-}" ] && compgen -G "$out/*.json" >/dev/null; then
        tar -C "$out" -cf "$log/gpu_results.tar.tmp" . && mv "$log/gpu_results.tar.tmp" "$log/gpu_results.tar"
    fi
done
exit $status
