#!/usr/bin/env bash
# One prepared GPU check: < 8 min on one H100/H200; prints one table and writes it to <out>/gpu_check.md
# (every stage's log and JSON lie next to it).
#
#   benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
# (a) simple_train.py on the GPU; (b) configs/default.yaml for 200 steps in bf16: steps/s, samples/s,
# peak memory and model FLOPs utilisation (FLOP method: benchmarks/flops.py); (c) the longest crop that
# trains at batch 1 in bf16, with and without activation checkpointing; (d) model.compile on vs off;
# (e) 1-GPU FSDP save + --resume auto bit-exactness (repeated with torch.use_deterministic_algorithms
# if not exact, else the measured difference); (f) the kill-and-resume test (tests/reliability) on the
# GPU. A stage that fails or overruns its time box is marked in the table; the next one runs.
# --dry-run: every stage tiny on the CPU (tests/test_gpu_check.py); its numbers mean nothing, and (e)
# runs the FSDP config unsharded there (accelerate applies FSDP only with a GPU process group).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-$(command -v python || command -v python3)}"
out="" dry=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --dry-run|--dry_run) dry=1; shift ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (see benchmarks/gpu_check.sh --help)" >&2; exit 2 ;;
    esac
done
out="${out:-outputs/gpu_check_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
results="$out/results.jsonl"
: > "$results"
export WANDB_MODE=disabled HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if command -v accelerate >/dev/null 2>&1; then accelerate=(accelerate launch); else
    accelerate=("$python" -m accelerate.commands.launch); fi

if (( dry )); then  # tiny everything, on the CPU
    export CUDA_VISIBLE_DEVICES=""
    precision='"no"'  # quoted: YAML 1.1 reads a bare no as false
    a_args=()
    b_args=(model.size=tiny data.max_length=32 training.batch_size=2 training.max_steps=6 training.log_every=2
            data.num_workers=0)
    crop_args=(--config configs/smoke.yaml --start 16 --cap 64 --step 16)
    compile_args=(--config configs/smoke.yaml --length 32 --batch 2 --steps 2 --blocks 2 --backend eager)
    fsdp_flags=(--fsdp_sync_module_states false)  # accelerate refuses module-state sync on the CPU
    box_scale=4  # time boxes x4: a shared CPU is slow
else
    precision=bf16
    a_args=()
    b_args=(training.max_steps=200 training.log_every=10)
    crop_args=(--config configs/default.yaml --start 512 --cap 16384 --step 256)
    compile_args=(--config configs/default.yaml --length 256 --batch 8 --steps 10 --blocks 4)
    fsdp_flags=()
    box_scale=1
fi
cache="$out/data_cache"

stage() {  # stage NAME BOX_SECONDS JSON_FILE NOTE_CMD -- command...: run with a time box, record the result
    local name="$1" box=$(( $2 * box_scale )) json="$3" t0 rc
    shift 3
    echo "== $name (time box ${box} s)" >&2
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$box" "$@" > "$out/$name.log" 2>&1
    rc=$?
    secs=$(echo "$(date +%s.%N) - $t0" | bc)
    last_rc=$rc last_secs=$secs
    [[ -n "$json" ]] || return "$rc"
    "$python" benchmarks/gpu_report.py record "$results" --stage "$name" --rc "$rc" --seconds "$secs" \
        --json "$json" --note "${note:-}"
    return "$rc"
}

{
    echo "# diffold GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    if (( dry )); then echo "dry run on the CPU: numbers mean nothing"; else
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'; fi
    "$python" -c "import torch, accelerate; print(f'torch {torch.__version__}, accelerate {accelerate.__version__}')"
} > "$out/header.txt" 2>&1

# (a) simple_train.py
note=""
stage a_simple_train_run 60 "" "$python" simple_train.py --output_dir "$out/a_simple_train" "${a_args[@]}" \
    "data.cache_dir=$cache"
note="$(grep -E '^simple_train: (finished|OK|FAILED)|\[FAIL\]' "$out/a_simple_train_run.log" | tr '\n' ' ')"
"$python" benchmarks/gpu_report.py record "$results" --stage a_simple_train --rc "$last_rc" --seconds "$last_secs" --note "$note"

# (b) configs/default.yaml, 200 steps, bf16: throughput, memory, FLOPs -> MFU
b_common=(--config configs/default.yaml "training.mixed_precision=$precision" training.validate_every=100000
          checkpoint.save_every_steps=100000 "logging.log_with=[]" logging.progress_bar=false "data.cache_dir=$cache"
          "${b_args[@]}")
note=""
stage b_train 150 "" "$python" train_full.py "${b_common[@]}" --output_dir "$out/b_default"
b_rc=$last_rc b_secs=$last_secs
stage b_flops 45 "" "$python" benchmarks/flops.py "${b_common[@]}" --batches 8
"$python" benchmarks/gpu_report.py train "$out/b_default" --flops "$out/b_flops.log" > "$out/b_summary.json" 2>>"$out/b_train.log" \
    || : > "$out/b_summary.json"
"$python" benchmarks/gpu_report.py record "$results" --stage b_default_200 --rc "$b_rc" --seconds "$b_secs" \
    --json "$out/b_summary.json"

# (c) longest crop at batch 1, with and without activation checkpointing
stage c_longest_crop 75 "$out/c_longest_crop.log" "$python" benchmarks/gpu_probe.py crop "${crop_args[@]}" \
    "training.mixed_precision=$precision"

# (d) model.compile on vs off
stage d_compile 110 "$out/d_compile.log" "$python" benchmarks/gpu_probe.py compile "${compile_args[@]}" \
    "training.mixed_precision=$precision"

# (e) 1-GPU FSDP: uninterrupted vs killed at step 13 + --resume auto (smoke model, 24 steps)
fsdp_run() {  # fsdp_run SCRIPT DIR extra...
    local script="$1" dir="$2"
    shift 2
    "${accelerate[@]}" --quiet --config_file accelerate_configs/fsdp.yaml --num_processes 1 "${fsdp_flags[@]}" \
        "$script" --config configs/smoke.yaml "training.mixed_precision=$precision" training.max_steps=24 \
        checkpoint.save_every_steps=4 validation.num_samples=1 validation.sampling_steps=3 "logging.log_with=[]" \
        "data.cache_dir=$cache" --output_dir "$dir" "$@"
}
fsdp_pair() {  # fsdp_pair SCRIPT TAG: uninterrupted, killed, resumed; then compare
    local script="$1" tag="$2"
    fsdp_run "$script" "$out/e_${tag}_uninterrupted" || return 1
    fsdp_run "$script" "$out/e_${tag}_killed" health.inject_faults=kill@13 && return 1  # must die
    fsdp_run "$script" "$out/e_${tag}_killed" --resume auto "health.inject_faults=" || return 1
    "$python" benchmarks/gpu_report.py compare "$out/e_${tag}_uninterrupted" "$out/e_${tag}_killed"
}
export -f fsdp_run fsdp_pair
export out precision cache python FSDP_FLAGS="${fsdp_flags[*]}" ACCEL="${accelerate[*]}"
# `timeout` runs programs, not functions: a bash that rebuilds the arrays from the exported strings
fsdp=(bash -c 'fsdp_flags=($FSDP_FLAGS); accelerate=($ACCEL); fsdp_pair "$@"' _)
stage e_fsdp_resume 90 "$out/e_fsdp_resume.log" "${fsdp[@]}" train_full.py default
# the deterministic repeat only if not exact and the 8 minutes allow it
if [[ "$(tail -n 1 "$out/e_fsdp_resume.log")" != *'"identical": true'* ]] && (( SECONDS < 330 * box_scale )); then
    export CUBLAS_WORKSPACE_CONFIG=:4096:8
    stage e_fsdp_resume_deterministic 90 "$out/e_fsdp_resume_deterministic.log" "${fsdp[@]}" \
        benchmarks/deterministic_train.py determ
fi

# (f) the kill-and-resume test of the reliability suite, on this machine's device
note=""
stage f_kill_resume_run 75 "" "$python" -m pytest -q -p no:cacheprovider tests/reliability/test_kill_resume.py \
    -k kill_in_validation --basetemp "$out/f_pytest"
note="$(tail -n 1 "$out/f_kill_resume_run.log")"
"$python" benchmarks/gpu_report.py record "$results" --stage f_kill_resume --rc "$last_rc" --seconds "$last_secs" --note "$note"

cat "$out/header.txt"
"$python" benchmarks/gpu_report.py table "$results" "$out/gpu_check.md"
cat "$out/header.txt" "$out/gpu_check.md" > "$out/gpu_check.md.tmp" && mv "$out/gpu_check.md.tmp" "$out/gpu_check.md"
echo "table: $out/gpu_check.md"
