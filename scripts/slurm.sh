#!/bin/bash
# Multi-node training under SLURM through Lightning's own launcher: SLURM starts one task per GPU
# and Lightning reads the ranks from SLURM's environment. Submit from the repository root:
#   sbatch --nodes 2 scripts/slurm.sh configs/fashion_mnist/distill_emd.yaml [more ayf fit options]
# The stage config comes first; configs/scale/gpus.yaml (DDP on every GPU) is layered over it,
# then the options that follow. Set --ntasks-per-node and --gpus-per-node to the GPUs of one node
# (8 below): trainer.devices and trainer.num_nodes are taken from them.
#SBATCH --job-name=ayf
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
set -euo pipefail
config="$1"
shift
srun ayf fit --config "$config" --config configs/scale/gpus.yaml \
  --trainer.devices "${SLURM_NTASKS_PER_NODE}" --trainer.num_nodes "${SLURM_JOB_NUM_NODES}" "$@"
