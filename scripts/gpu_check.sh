#!/usr/bin/env bash
# GPU check: what CI cannot run. On one CUDA GPU, after `CLIPCOMPRESS_FAISS=gpu bash scripts/setup_env.sh`
# (the README's setup with a GPU faiss in place of faiss-cpu), with no edits: every job for ~100 steps
# under amp and amp_bf16 (--torchcompile and --grad-checkpointing once each), one run under an NCCL
# process group, a faiss-gpu k-means, the monitor on
# CUDA, and bench_trainer.py against open_clip_train (ViT-B-32, 224 px, amp_bf16, batch 256). Prints each
# run's peak GPU memory and both trainers' samples/s. Meant to take under 8 minutes on one H100-class GPU.
#
#   bash scripts/gpu_check.sh            # GPU_CHECK_DIR=... to write elsewhere (default: a temp folder)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PATH="$REPO/.venv/bin:$PATH" PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ROOT="${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
CORPUS="$ROOT/corpus"
LOGS="$ROOT/logs"
EVAL="$CORPUS/eval"
WORKERS="${GPU_CHECK_WORKERS:-8}"
START=$SECONDS
step() { printf '\n=== [%4ds] %s\n' "$((SECONDS - START))" "$*"; }
mkdir -p "$LOGS"

python - <<'EOF'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

# the trainer in this process, then its peak GPU memory (what torch allocated; the caching allocator holds more)
PEAK='import sys, torch
from training.main import main
try:
    main(sys.argv[1:])
finally:
    print(f"peak GPU memory of {sys.argv[sys.argv.index(\"--name\") + 1]}: "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)'
train() { python -c "$PEAK" "$@" --logs-root "$LOGS" --workers "$WORKERS" --log-level warning --report-to none; }

step "corpus: 12800 captioned 224 px pictures in 16 shards, COCO-style and ImageFolder eval sets"
python -m utils.make_corpus --out "$CORPUS" --train-size 12800 --eval-size 200 --image-size 224 \
    --shard-size 800 --workers "$WORKERS"

# 100 steps: 12800 samples at batch 128, one epoch
COMMON=(--model clipc-vit-t2-64 --batch-size 128 --epochs 1 --lr 1e-3 --warmup 10 --log-every-n-steps 25)

step "clip, amp, under torchrun with an NCCL process group, with in-loop zero-shot eval"
python -m torch.distributed.run --nproc_per_node 1 -m training.main --job clip "${COMMON[@]}" \
    --train-data "$CORPUS/train.tsv" --precision amp --dist-backend nccl --zeroshot-frequency 1 \
    --eval-data-dir "$EVAL" --logs-root "$LOGS" --name clip_amp_nccl --workers "$WORKERS" --log-level warning \
    --report-to none
DENSE="$LOGS/clip_amp_nccl/checkpoints/epoch_1.pt"
test -f "$DENSE"

step "clip, amp_bf16, --torchcompile, webdataset shards"
train --job clip "${COMMON[@]}" --train-data "$CORPUS/shards/{000000..000015}.tar" --train-num-samples 12800 \
    --precision amp_bf16 --torchcompile --name clip_bf16_compile

step "protorkd, amp and amp_bf16 (MiniLM teacher, faiss-gpu prototypes)"
for precision in amp amp_bf16; do
  train --job protorkd "${COMMON[@]}" --train-data "$CORPUS/train.tsv" --dataset-size 12800 --episode-size 12800 \
      --add-projection-head --projection-hidden-dim 512 --distiller mse,infonce,proto --k 256 --precision "$precision" \
      --name "protorkd_$precision"
done

step "prune p=0.5 with --KD, amp and amp_bf16 (the amp_bf16 one with --grad-checkpointing)"
PRUNE=(--job prune --model clipc-vit-t2-64 --pretrained "$DENSE" --p 0.5 --KD
       --train-data "$CORPUS/shards/{000000..000015}.tar" --dataset-resampled --train-num-samples 6400
       --epochs 2 --search-epochs 1 --search-interval 4 --batch-size 128 --lr 2e-4 --warmup 4)
train "${PRUNE[@]}" --precision amp --name prune_amp
train "${PRUNE[@]}" --precision amp_bf16 --grad-checkpointing --name prune_bf16_gc

step "distill the dense image tower into a small student, amp and amp_bf16"
for precision in amp amp_bf16; do
  train --job distill --teacher-model clipc-vit-t2-64 --teacher-pretrained "$DENSE" --student teacher \
      --student-layers 1 --student-width 64 --student-image-size 32 --inherit-from-teacher \
      --distill-loss cosine,icl --train-data "$CORPUS/train.tsv" --batch-size 128 --epochs 1 --lr 1e-3 \
      --warmup 10 --precision "$precision" --name "distill_$precision"
done

step "faiss-gpu k-means (the build setup_env.sh installed, on this GPU)"
python - <<'EOF'
import time
import faiss
import numpy as np
from training.accel import faiss_summary

print(faiss_summary())
assert faiss.get_num_gpus() >= 1, "faiss sees no GPU: is faiss-cpu installed instead of faiss-gpu-cu12?"
points = np.random.default_rng(0).standard_normal((200_000, 384)).astype(np.float32)
start = time.perf_counter()
kmeans = faiss.Kmeans(384, 1000, niter=20, gpu=True, seed=0)
kmeans.train(points)
print(f"faiss-gpu k-means: 200k x 384 into 1000 centroids in {time.perf_counter() - start:.1f} s, "
      f"objective {kmeans.obj[-1]:.4g}")
EOF

step "the monitor on CUDA: zero-shot, linear probe and retrieval of the dense checkpoint"
python src/utils/evaluate_checkpoints.py --logs-dir "$LOGS/clip_amp_nccl" --eval-data-dir "$EVAL" --once \
    --epoch 1 --device cuda --workers "$WORKERS" --log-level warning \
    --benchmarks zeroshot linear_probe retrieval

step "bench_trainer.py: ours against open_clip_train, ViT-B-32, 224 px, amp_bf16, batch 256"
python scripts/bench_trainer.py --corpus "$CORPUS" --model ViT-B-32 --batch-size 256 --precision amp_bf16 \
    --workers "$WORKERS" --samples 10240 --log-every 8 --rounds 1

step "done in $((SECONDS - START)) s; run folders in $LOGS"
