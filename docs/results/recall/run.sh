#!/bin/bash
# paired seeds of the recall test, 6000 steps; seed 1 continues the 4000-step run from step 3000 (identical
# up to its first LR decay at 3200)
# seed 1 starts from a copy of that run: cp -r <4,000-step run>/{moe,engram} runs/recall6k/s1/
cd "$(git rev-parse --show-toplevel)"  # from anywhere in the repository
export OMP_NUM_THREADS=1
common="--set data.recall_docs=150000 --set train.max_steps=6000 --set train.checkpoint.every=500 --set train.checkpoint.keep=0 --set train.eval.every=1000 --no-progress"
for s in 1 2 3; do
  extra=""; [ $s = 1 ] && extra="--resume-from 3000"
  for m in moe engram; do
    .venv/bin/engram train --preset demo-$m --out runs/recall6k/s$s/$m --set train.seed=$s $common $extra \
      > runs/recall6k/s$s-$m.log 2>&1 &
  done
  wait
  echo "seed $s done $(date)" >> runs/recall6k/progress
done
