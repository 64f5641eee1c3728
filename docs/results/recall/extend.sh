#!/bin/bash
# YaRN x4 extension of a seed's pair (300 steps at 1,024 tokens, batch 2, LR 1e-3), then every recall eval
cd "$(git rev-parse --show-toplevel)"  # from anywhere in the repository
export OMP_NUM_THREADS=1
s=$1
for m in moe engram; do
  .venv/bin/engram train --preset demo-$m --out runs/recall6k/s$s/$m-yarn4 --set train.seed=$s \
    --init-from runs/recall6k/s$s/$m/checkpoints/step_0006000 \
    --set data.recall_docs=150000 --set model.backbone.max_seq_len=1024 --set train.seq_len=1024 \
    --set train.batch_size=2 --set 'model.backbone.rope_scaling={"factor": 4, "original_max_seq_len": 256}' \
    --set train.max_steps=300 --set train.lr=0.001 --set train.warmup_steps=10 --set train.checkpoint.every=300 \
    --set train.eval.every=300 --no-progress > runs/recall6k/s$s-$m-yarn4.log 2>&1 &
done
wait
full="--lengths 8 16 32 64 128 --pairs 2 4 8 16 24 32 48 --gaps 0 50 100 200 300 400 --samples 32"
for m in moe engram; do
  ( .venv/bin/engram eval recall --ckpt runs/recall6k/s$s/$m --every-checkpoint --lengths 8 16 32 --pairs 2 4 8 16 \
      --samples 32 --out runs/recall6k/eval/s$s-$m-curve > /dev/null 2>&1
    .venv/bin/engram eval recall --ckpt runs/recall6k/s$s/$m $full --out runs/recall6k/eval/s$s-$m-final > /dev/null 2>&1
    .venv/bin/engram eval recall --ckpt runs/recall6k/s$s/$m-yarn4 $full --out runs/recall6k/eval/s$s-$m-yarn4 \
      > /dev/null 2>&1 ) &
done
wait
echo "seed $s extended and scored $(date)" >> runs/recall6k/progress
