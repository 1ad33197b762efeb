#!/usr/bin/env bash
# SLURM batch script for GPU clusters: ONE task per node, owning all of that node's GPUs.
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh configs/tldr.py /shared/runs/tldr \
#       --config.mesh.data=2 --config.mesh.fsdp=8
# Why one task per node: JAX's SLURM detection gives a task local_device_ids=[SLURM_LOCALID]
# (one GPU) when it runs one task per GPU; with one task per node we pass every local GPU
# explicitly, so each process drives its 8 GPUs and NCCL keeps intra-node traffic on NVLink.
# Needs a venv made once with `make setup && .venv/bin/pip install 'jax[cuda12]'` on shared storage.
# Export P3O_JAX_COMPILE_CACHE=<a folder on shared storage> so that every node of a restarted job
# loads the programs process 0 compiled and wrote there.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=$1 workdir=$2; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
coordinator="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):${P3O_PORT:-12321}"
gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)"
srun bash -c ".venv/bin/python -m p3o_jax.main --distributed --coordinator_address=$coordinator \
  --num_processes=\$SLURM_NTASKS --process_id=\$SLURM_PROCID --local_device_ids=$gpus \
  --config=$config --workdir=$workdir $*"
