#!/usr/bin/env bash
# The Imagenette zoo (docs/results.md, "Imagenette"): a ResNet-18 teacher from random init, the edge
# ViT (also the token selector), then the server ViT distilled from the teacher with token dropout on
# edge-attention and random subsets, at 112 px (a 7×7 grid of the paper's 16-pixel patches); then both
# fine-tuned at 160 px (a 10×10 grid, the position embeddings resampled): the shipped pair.
# Each step resumes exactly from its last finished epoch when run again, and is skipped once done.
# shared/zoo/imagenette-{edge,server}.safetensors are the last two steps' model.safetensors
# (RUNS_DIR/nette160-{edge,server}); copy them there to count those steps as done.
# Usage: scripts/train_imagenette.sh [RUNS_DIR] (default runs/); THREADS=N sets torch threads.
set -euo pipefail
runs=${1:-runs}
threads=${THREADS:-2}
common=(patchcast train --threads "$threads" --norm imagenet --data imagenette2/train.tar
    --test-data imagenette2/val.tar --patch-size 16 --aug rrc --rrc-scale-min 0.35)
pc=("${common[@]}" --img-size 112)

step() {  # step OUT ARGS…: train unless OUT/model.safetensors exists
    local out=$1; shift
    if [[ -f $out/model.safetensors ]]; then echo "done: $out"; return; fi
    "${pc[@]}" --out "$out" "$@"
}

step "$runs/nette-r18" --arch resnet18 --name imagenette-resnet18 --epochs 8 --batch-size 128 --lr 2e-3 \
    --warmup-epochs 1
step "$runs/nette-edge" --name imagenette-edge --dim 96 --depth 6 --heads 3 --reg-tokens 4 --epochs 20 \
    --batch-size 128 --lr 2e-3 --warmup-epochs 2 --teacher "file:$runs/nette-r18/model.safetensors" --distill-weight 0.5
step "$runs/nette-server" --name imagenette-server --dim 192 --depth 6 --heads 3 --epochs 32 --batch-size 128 \
    --lr 1e-3 --warmup-epochs 3 --mixup 0.8 --cutmix 1.0 --mix-prob 0.3 \
    --teacher "file:$runs/nette-r18/model.safetensors" --distill-weight 0.5 --distill-temperature 2 \
    --token-dropout 0.5 --token-keep-min 0.25 --token-selector "file:$runs/nette-edge/model.safetensors" \
    --token-attention-share 0.75
# A second stage: the server above, trained on with a fresh one-cycle schedule and the same distillation
# and token dropout (its curve was still rising at epoch 32). The zoo's server is this stage's output.
step "$runs/nette-server-2" --name imagenette-server --dim 192 --depth 6 --heads 3 --epochs 20 --batch-size 128 \
    --lr 5e-4 --warmup-epochs 1 --mixup 0.8 --cutmix 1.0 --mix-prob 0.3 \
    --init "file:$runs/nette-server/model.safetensors" \
    --teacher "file:$runs/nette-r18/model.safetensors" --distill-weight 0.5 --distill-temperature 2 \
    --token-dropout 0.5 --token-keep-min 0.25 --token-selector "file:$runs/nette-edge/model.safetensors" \
    --token-attention-share 0.75
# The shipped pair: both fine-tuned at 160 px (10×10 patches) from the 112 px models above, 6 epochs each,
# without distillation (as they were made: the teacher above had not been kept). The edge first: the
# server's token dropout ranks patches by its attention.
pc=("${common[@]}" --img-size 160)
step "$runs/nette160-edge" --name imagenette-edge --dim 96 --depth 6 --heads 3 --reg-tokens 4 --epochs 6 \
    --batch-size 128 --lr 5e-4 --warmup-epochs 0.5 --init "file:$runs/nette-edge/model.safetensors"
step "$runs/nette160-server" --name imagenette-server --dim 192 --depth 6 --heads 3 --epochs 6 --batch-size 128 \
    --lr 2.5e-4 --warmup-epochs 0.5 --mixup 0.8 --cutmix 1.0 --mix-prob 0.3 \
    --token-dropout 0.5 --token-keep-min 0.25 --token-selector "file:$runs/nette160-edge/model.safetensors" \
    --token-attention-share 0.75 --init "file:$runs/nette-server-2/model.safetensors"
