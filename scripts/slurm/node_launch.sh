#!/bin/bash
# One node's part of scripts/slurm/train.sbatch: srun starts it once per node; it execs one
# `accelerate launch` (torchrun inside) for this node's processes. Arguments go to train_full.py.
set -euo pipefail
rank="${SLURM_NODEID:?node_launch.sh is started by srun from train.sbatch (SLURM_NODEID is not set)}"
: "${DIFFOLD_HOME:?}" "${DIFFOLD_NNODES:?}" "${DIFFOLD_WORLD:?}" "${DIFFOLD_ACCEL_CONFIG:?}"
: "${DIFFOLD_MASTER_ADDR:?}" "${DIFFOLD_MASTER_PORT:?}"
# torchrun handles SIGUSR1 like SIGTERM (passes it on to the training processes, which checkpoint and
# exit 75) instead of dying of it, and waits DIFFOLD_GRACE_S for them before it kills them (default 30 s)
export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${DIFFOLD_GRACE_S:-240}"
if command -v accelerate >/dev/null 2>&1; then launcher=(accelerate launch); else
    launcher=("${PYTHON:-python}" -m accelerate.commands.launch); fi
cmd=("${launcher[@]}" --quiet --config_file "$DIFFOLD_ACCEL_CONFIG" --num_machines "$DIFFOLD_NNODES"
     --num_processes "$DIFFOLD_WORLD" --machine_rank "$rank" --main_process_ip "$DIFFOLD_MASTER_ADDR"
     --main_process_port "$DIFFOLD_MASTER_PORT" --same_network --rdzv_backend static
     "$DIFFOLD_HOME/train_full.py" "$@")
echo "diffold node $rank ($(hostname)): PET_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT ${cmd[*]}" >&2
[[ -n "${DIFFOLD_DRY_RUN:-}" ]] && exit 0
exec "${cmd[@]}"
