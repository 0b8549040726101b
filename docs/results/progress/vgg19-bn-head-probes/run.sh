#!/bin/bash
# VGG-19 BN-head probes (issue 29): 2 epochs on 12,800 training images, validation 2,000.
# Usage, from the repository: docs/results/progress/vgg19-bn-head-probes/run.sh "A" "C --lr 0.001" ...
# (each argument: a probe name, then the flags it changes); runs go to ${OUT:-runs/probe19}.
out=${OUT:-runs/probe19}; mkdir -p "$out"
base="--recipe vgg19-bn-head-cifar10 --dataset folder:../shared/data/cifar10-jpg.zip --subset 12800 --val-split 2000 --epochs 2 --no-report --log-every 120 --overwrite"
run() { name=$1; shift
  echo "$name start $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)" >> "$out/log"
  vggkit train $base --out "$out/$name" "$@" > "$out/$name.log" 2>&1
  echo "$name end $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg) $(grep -o 'val_acc [0-9.]*%' "$out/$name.log" | tr '\n' ' ')" >> "$out/log"
}
for spec in "$@"; do eval "run $spec"; done
