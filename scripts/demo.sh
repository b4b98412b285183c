#!/usr/bin/env bash
# The README's main command: set up, generate the embedded corpus, then run every job on it and score
# everything with the monitor. ~15 minutes on a 2-core CPU machine. Results: logs/demo/, report at the end.
#
#   bash scripts/demo.sh                 # DEMO_DIR=... to write elsewhere (default: the repo)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup_env.sh"
cd "$REPO"
export PATH="$REPO/.venv/bin:$PATH" PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ROOT="${DEMO_DIR:-$REPO}"
CORPUS="$ROOT/data/demo"
LOGS="$ROOT/logs/demo"
EVAL="$CORPUS/eval"
START=$SECONDS
step() { printf '\n=== [%4ds] %s\n' "$((SECONDS - START))" "$*"; }
rm -rf "$LOGS"; mkdir -p "$LOGS"

step "1/8 generate the corpus (20k captioned pictures + COCO-style and ImageFolder eval sets)"
python -m utils.make_corpus --out "$CORPUS" --train-size 20000 --eval-size 1000 --workers 2

step "2/8 train the demo CLIP: --job clip, 2 processes (torchrun, gloo)"
torchrun --nproc_per_node 2 -m training.main --job clip --model clipc-vit-t2-64 \
    --train-data "$CORPUS/train.tsv" --batch-size 64 --epochs 3 --lr 1e-3 --wd 0.1 --warmup 50 --workers 1 \
    --local-loss --gather-with-grad --save-every-n-steps 100 --logs-root "$LOGS" --name clip --log-level warning
DENSE="$LOGS/clip/checkpoints/epoch_3.pt"
python - "$LOGS/clip/results.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train/loss"' in l]
print("clip loss (tensorboard train/loss): " + " -> ".join(f"{r['train/loss']:.3f}@{r['step']}" for r in rows[::max(1, len(rows) // 6)] + rows[-1:]))
EOF

step "3/8 score the dense CLIP with the monitor"
python src/utils/evaluate_checkpoints.py --logs-dir "$LOGS/clip" --eval-data-dir "$EVAL" --once --epoch 3 --log-level warning

step "4/8 ProtoRKD: image student distilled from the bundled all-MiniLM-L6-v2, and the same student without a teacher"
PROTO_COMMON=(--train-data "$CORPUS/train.tsv" --dataset-size 5000 --episode-size 8192 --model clipc-vit-t2-64 --epochs 2
              --batch-size 64 --lr 1e-3 --warmup 10 --workers 1 --logs-root "$LOGS" --log-level warning)
python -m training.main --job protorkd "${PROTO_COMMON[@]}" --name protorkd_minilm \
    --add-projection-head --projection-hidden-dim 512 --distiller mse,infonce
python -m training.main --job clip "${PROTO_COMMON[@]}" --name protorkd_no_teacher

step "5/8 prune the demo CLIP at p=0.5 (UPop search + surgery + fine-tune), with and without --KD"
PRUNE_COMMON=(--job prune --model clipc-vit-t2-64 --pretrained "$DENSE" --p 0.5
              --train-data "$CORPUS/shards/{000000..000019}.tar" --dataset-resampled --train-num-samples 4096
              --epochs 2 --search-epochs 1 --search-interval 4 --batch-size 64 --lr 2e-4 --warmup 4
              --workers 1 --logs-root "$LOGS" --log-level warning)
python -m training.main "${PRUNE_COMMON[@]}" --KD --name prune_p0.5_kd
python -m training.main "${PRUNE_COMMON[@]}" --name prune_p0.5

step "6/8 distil the CLIP image tower into a 1-layer ViT student at 32 px (inherited from the CLIP), then the cascaded search"
# the cascade's cheap level: one of the CLIP's two layers at its width, on a quarter of its patches, so indexing
# the gallery costs little more than decoding it (a MobileNetV3-S at 64 px costs two thirds of the CLIP on a CPU)
python -m training.main --job distill --teacher-model clipc-vit-t2-64 --teacher-pretrained "$DENSE" \
    --student teacher --student-layers 1 --student-width 128 --student-image-size 32 --inherit-from-teacher \
    --distill-loss cosine,icl --train-data "$CORPUS/train.tsv" --epochs 1 \
    --batch-size 64 --lr 1e-3 --warmup 20 --workers 1 --logs-root "$LOGS" --name distill_student --log-level warning
STUDENT="$LOGS/distill_student/checkpoints/epoch_1.pt"
python -m utils.cascade --config scripts/experiments/cascade_topk_demo.toml \
    --levels "$STUDENT" "$DENSE" --eval-data-dir "$EVAL" --plot "$LOGS/cascade_topk.png" --log-level warning
# the search tool itself: index the eval gallery with the student, answer two queries, re-ranked by the CLIP
python -m utils.cascade index --gallery "$EVAL" --levels "$STUDENT" "$DENSE" --out "$LOGS/gallery_index" \
    --log-level warning
python -m utils.cascade search "$LOGS/gallery_index" "two large red circles" "a blue star on a black background" \
    --k 5 --m 50 --log-level warning

step "7/8 post-training compression of the dense CLIP: low-rank, Fisher pruning under a MAC budget, token masking"
python -m utils.lowrank      --pretrained "$DENSE" --out "$LOGS/lowrank_0.5" --ratio 0.5 --towers image,text
python -m utils.fisher_prune --pretrained "$DENSE" --out "$LOGS/fisher_mac0.6" --mac-constraint 0.6 \
    --calib-data "$CORPUS/train.tsv"
python -m utils.token_mask   --pretrained "$DENSE" --out "$LOGS/flip_0.5" --drop 0.5

step "8/8 score every run with the monitor, then the compression report"
# the last checkpoint of each run (the monitor scores every epoch_N.pt without --epoch)
for run in protorkd_minilm:2 protorkd_no_teacher:2 prune_p0.5_kd:2 prune_p0.5:2 distill_student:1 lowrank_0.5:0 \
           fisher_mac0.6:0 flip_0.5:0; do
  python src/utils/evaluate_checkpoints.py --logs-dir "$LOGS/${run%:*}" --epoch "${run#*:}" --eval-data-dir "$EVAL" \
      --once --log-level warning --benchmarks zeroshot linear_probe retrieval --topk 1 3 5 10 20 \
      > "$LOGS/${run%:*}.monitor.txt"
done
python -m utils.report "$LOGS"/clip "$LOGS"/protorkd_minilm "$LOGS"/protorkd_no_teacher "$LOGS"/prune_p0.5_kd \
    "$LOGS"/prune_p0.5 "$LOGS"/distill_student "$LOGS"/lowrank_0.5 "$LOGS"/fisher_mac0.6 "$LOGS"/flip_0.5 \
    --out-dir "$LOGS/report"
step "done: run folders in $LOGS, report in $LOGS/report"
