#!/usr/bin/env bash
# Train with the Accelerate config that fits this machine: a thin wrapper over `accelerate launch`.
#
#   ./launch_train.sh --config C [--num_gpus N] [--output_dir D] [--resume auto|latest|best|PATH]
#                     [--preset P] [--task rna|protein] [--dry_run] [key=value ...]
#
# --num_gpus N  processes to start (default: every GPU `nvidia-smi -L` lists, else 1 CPU process).
#               GPUs: 1 -> accelerate_configs/single_gpu.yaml, N > 1 -> multi_gpu.yaml on GPUs 0..N-1.
#               No GPU (or N = 0): 1 -> cpu.yaml, N > 1 -> cpu_ddp.yaml (N CPU processes over gloo).
# --output_dir  default: logging.output_dir/<run_name or config stem_timestamp>, chosen here and passed
#               on, so the resume command can name it.
# --dry_run     print the command, run nothing.
# It prints the exact `accelerate launch` line, runs it and exits with train_full.py's own exit code
# (0 ok, 2 bad input, 3 gave up / final save failed, 4 unhealthy, 5 distributed failure,
# 75 interrupted), read from the run's `end` event: `accelerate launch` reports every failure as 1.
# Several machines: scripts/slurm/train.sbatch (README, "Scaling out").
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$(command -v python || command -v python3)}"
die() { echo "error: $*" >&2; exit 2; }
usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
show() {  # a command line as it can be pasted back into a shell (quotes only where needed)
    local w out=()
    for w in "$@"; do
        if [[ "$w" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then out+=("$w"); else out+=("$(printf '%q' "$w")"); fi
    done
    echo "${out[*]}"
}

config="" num_gpus="" output_dir="" resume="" dry_run=0
passthrough=() overrides=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config|--num_gpus|--output_dir|--resume|--preset|--task)
            [[ $# -ge 2 ]] || die "$1 needs a value (see ./launch_train.sh --help)"
            case "$1" in
                --config) config="$2" ;;
                --num_gpus) num_gpus="$2" ;;
                --output_dir) output_dir="$2" ;;
                --resume) resume="$2" ;;
                *) passthrough+=("$1" "$2") ;;
            esac
            shift 2 ;;
        --config=*|--num_gpus=*|--output_dir=*|--resume=*|--preset=*|--task=*)
            set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        --dry_run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see ./launch_train.sh --help)" ;;
        *) overrides+=("$1"); shift ;;
    esac
done
[[ -n "$config" ]] || die "--config is required, e.g. ./launch_train.sh --config configs/smoke.yaml"
[[ -f "$config" ]] || die "--config $config: no such file"
[[ -z "$num_gpus" || "$num_gpus" =~ ^[0-9]+$ ]] || die "--num_gpus $num_gpus: give a whole number (0 = CPU)"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || gpus=0
fi
n="${num_gpus:-$(( gpus > 0 ? gpus : 1 ))}"
configs="$here/accelerate_configs"
if (( gpus == 0 || n == 0 )); then
    procs=$(( n > 0 ? n : 1 ))
    if (( gpus == 0 )); then where="no GPU found (nvidia-smi lists none)"; else where="--num_gpus 0"; fi
    if (( procs == 1 )); then
        launch=(--config_file "$configs/cpu.yaml")
        echo "launch_train: $where: 1 CPU process (accelerate_configs/cpu.yaml)" >&2
    else
        launch=(--config_file "$configs/cpu_ddp.yaml" --num_processes "$procs")
        echo "launch_train: $where: $procs CPU processes over gloo (accelerate_configs/cpu_ddp.yaml)" >&2
    fi
elif (( n > gpus )); then
    die "--num_gpus $n: this machine has $gpus GPU(s) (nvidia-smi -L); several machines: scripts/slurm/train.sbatch"
elif (( n == 1 )); then
    launch=(--config_file "$configs/single_gpu.yaml")
    echo "launch_train: 1 of $gpus GPU(s) (accelerate_configs/single_gpu.yaml)" >&2
else
    launch=(--config_file "$configs/multi_gpu.yaml" --num_processes "$n")
    ids="all"
    if (( n < gpus )); then ids=$(seq -s, 0 $(( n - 1 ))); launch+=(--gpu_ids "$ids"); fi
    echo "launch_train: $n of $gpus GPUs, DDP (accelerate_configs/multi_gpu.yaml, GPUs $ids)" >&2
fi

if [[ -z "$output_dir" ]]; then
    output_dir=$("$python" -m diffold.launch_cli run-dir --config "$config" ${passthrough[@]+"${passthrough[@]}"} \
                 ${overrides[@]+"${overrides[@]}"}) || exit $?
    echo "launch_train: run directory $output_dir (pass --output_dir to choose it)" >&2
fi
DIFFOLD_RESUME_COMMAND="$(show "$0" --num_gpus "$n" --config "$output_dir/config.yaml" --output_dir "$output_dir" \
    --resume auto)"
export DIFFOLD_RESUME_COMMAND

if command -v accelerate >/dev/null 2>&1; then accelerate=(accelerate launch); else
    accelerate=("$python" -m accelerate.commands.launch); fi
cmd=("${accelerate[@]}" --quiet "${launch[@]}" "$here/train_full.py" --config "$config" --output_dir "$output_dir")
[[ -n "$resume" ]] && cmd+=(--resume "$resume")
cmd+=(${passthrough[@]+"${passthrough[@]}"} ${overrides[@]+"${overrides[@]}"})
echo "+ $(show "${cmd[@]}")" >&2
(( dry_run )) && exit 0

offset=$({ wc -c < "$output_dir/metrics.jsonl"; } 2>/dev/null || echo 0)
"${cmd[@]}"
rc=$?
if (( rc != 0 )); then  # the launcher says 1 (or 128+signal); the run's end event says why
    code=$("$python" -m diffold.launch_cli exit-code "$output_dir" --since "$offset" 2>/dev/null) && rc=$code
fi
exit "$rc"
