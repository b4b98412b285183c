#!/usr/bin/env bash
# Example SLURM batch script: 2 nodes x 8 GPUs, one torchrun per node.
#SBATCH --job-name=clipcompress
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=29500
cd "${SLURM_SUBMIT_DIR}"
. .venv/bin/activate
srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 --node-rank "$SLURM_NODEID" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m training.main --job clip --model ViT-B-32 --train-data '/data/cc3m/{00000..00331}.tar' \
    --train-num-samples 2800000 --dataset-resampled --batch-size 256 --precision amp_bf16 \
    --local-loss --gather-with-grad --epochs 32 --lr 5e-4 --warmup 2000 --workers 8 \
    --logs-root logs --name cc3m_vitb32 --save-every-n-steps 1000 --resume latest
# Without torchrun, `srun --ntasks-per-node 8 python -m training.main ...` works too: the trainer reads
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (MASTER_ADDR/MASTER_PORT exported as above).
