#!/bin/bash
# The launch line of one node of scripts/slurm/supcon-train.sbatch (srun runs it once per node): torchrun with
# the c10d rendezvous on the job's first node. Reads SLURM_NNODES, SLURM_NODEID and SLURM_JOB_ID (set by srun),
# RDZV_HOST, RDZV_PORT, GPUS_PER_NODE and MAX_RESTARTS (set by the sbatch script); the arguments go to
# supcon-train. The job id is the rendezvous id: the run records it, and a restarted process resumes only a run
# that its own launch wrote.
# A fresh rendezvous store per restart: with torchrun's one shared store, the processes a restart starts on
# several nodes could meet the failed processes' addresses there (supcon-train refuses that combination).
set -euo pipefail
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec "${TORCHRUN:-torchrun}" --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$SLURM_NODEID" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID" \
  --max-restarts "$MAX_RESTARTS" -m supcon.cli "$@"
