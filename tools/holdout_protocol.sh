#!/usr/bin/env bash
# The held-out protocol behind the ATM ladder and the README's Results, end to end:
#   bash tools/holdout_protocol.sh IMAGES WEIGHTS OUT
# IMAGES: a folder of ImageNet class folders (wnid names); WEIGHTS: ViT-Ti/16 weights
# (vit_tiny_patch16_224.augreg_in21k_ft_in1k). Half of IMAGES (seed 0) calibrates ATM for 20, 30
# and 40% fewer GFLOPs; the other half, also mirrored and with the full image as crop, reports
# ATM beside the ToMe and EViT sweeps. Made for 1000 images (500 + 500); ~1 h on 2 CPU cores.
set -euo pipefail
images=$1 weights=$2 out=$3
split=$out/split
python "$(dirname "$0")/holdout_split.py" "$images" "$split" --fraction 0.5 --seed 0
for target in 20 30 40; do
  atm calibrate --config configs/vit_t_dense.yaml --model.weights "$weights" --data.root "$split" \
    --target_reduction 0.$target --num_images 500 --output "$out/atm_$target.yaml"
done
atm calibrate --config configs/vit_t_dense.yaml --model.merger ATM --model.weights "$weights" \
  --data.root "$split" --target_reduction 0.3 --num_images 500 --output "$out/paper_30.yaml"  # the paper's options
ladder=("$out/atm_20.yaml" "$out/atm_30.yaml" "$out/atm_40.yaml")
common=(--config configs/vit_t.yaml --model.weights "$weights" --data.root "$split")
atm compare "${common[@]}" --sweep --atm "$out/paper_30.yaml" "${ladder[@]}" --output "$out/held_out"
atm compare "${common[@]}" --data.eval_hflip true --tome_r 10 13 --atm "${ladder[@]}" --output "$out/held_out_flipped"
atm compare "${common[@]}" --data.crop_pct 1.0 --tome_r 10 13 --atm "${ladder[@]}" --output "$out/held_out_crop1"
