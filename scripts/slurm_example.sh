#!/usr/bin/env bash
# SLURM batch script: 2 nodes x 8 GPUs, one task per GPU started by srun (no torchrun), preemption-safe.
#
#   sbatch scripts/slurm_example.sh                        # the example run below
#   sbatch scripts/slurm_example.sh --job clip --model ... # your trainer flags instead of the example's
#
# A stop - SIGTERM at preemption or at the time limit, or SIGUSR1 120 s before the limit (--signal below) -
# makes every rank finish its step, write epoch_latest.pt and exit 75. srun passes 75 on (it exits with its
# tasks' highest code), and this script then requeues the job, which runs this same script again: the
# trainer resumes from epoch_latest.pt (--resume latest is always added). docs/cluster.md has the details.
#SBATCH --job-name=clipcompress
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail  # no -e: srun's exit code decides what happens next

STOP_EXIT_CODE=75  # training.preemption.STOP_EXIT_CODE
# every rank reaches the first node's rendezvous; the port follows the job id, so two jobs sharing a node
# do not meet on one port
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
cd "$SLURM_SUBMIT_DIR"
. .venv/bin/activate

if [ "$#" -eq 0 ]; then
    set -- --job clip --model ViT-B-32 --train-data '/data/cc3m/{00000..00331}.tar' \
        --train-num-samples 2800000 --dataset-resampled --batch-size 256 --precision amp_bf16 \
        --local-loss --gather-with-grad --epochs 32 --lr 5e-4 --warmup 2000 --workers 8 \
        --logs-root logs --name cc3m_vitb32 --save-every-n-steps 1000
fi

# SLURM signals this shell too at preemption and at the time limit: with a trap it outlives the signal
# and waits for srun, whose exit code says whether to requeue
trap 'echo "slurm_example.sh: SIGTERM; waiting for the trainer to write epoch_latest.pt"' TERM

# --gpus-per-task=1 gives each task one GPU, which it sees as cuda:0: hence --no-set-device-rank (drop it
# with --gpus-per-node=8, where every task sees all eight). --kill-on-bad-exit=0 and --wait: on a stop,
# the first rank out must not take down the others before they exit themselves
srun --kill-on-bad-exit=0 --wait=120 python -u -m training.main --no-set-device-rank "$@" --resume latest
rc=$?
if [ "$rc" -eq "$STOP_EXIT_CODE" ]; then
    echo "slurm_example.sh: the trainer stopped on a signal and saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || echo "slurm_example.sh: scontrol requeue failed; resubmit this script"
fi
exit "$rc"
