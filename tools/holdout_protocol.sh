#!/usr/bin/env bash
# The held-out protocol behind the ATM ladder and the README's Results, end to end:
#   bash tools/holdout_protocol.sh IMAGES WEIGHTS OUT
# IMAGES: a folder of ImageNet class folders (wnid names); WEIGHTS: ViT-Ti/16 weights
# (vit_tiny_patch16_224.augreg_in21k_ft_in1k). Half of IMAGES (seed 0) calibrates ATM for 20, 30
# and 40% fewer GFLOPs; the other half, also mirrored and with the full image as crop, reports
# ATM beside the ToMe and EViT sweeps. Made for 1000 images (500 + 500); ~2 h on 2 CPU cores.
set -euo pipefail
images=$1 weights=$2 out=$3
split=$out/split
python "$(dirname "$0")/holdout_split.py" "$images" "$split" --fraction 0.5 --seed 0
# Each target with each rerun fraction; the calibration half's own lines ("chosen: ...") decide
# the fraction (most agreement, then least KL): 0.1 at 20%, 0.1 at 30%, 0.05 at 40%
# (docs/calibration.md, "Choosing the rerun fraction").
for target in 20 30 40; do
  for fraction in 0 0.05 0.1; do
    atm calibrate --config configs/vit_t_dense.yaml --model.weights "$weights" --data.root "$split" \
      --target_reduction 0.$target --num_images 500 --rerun_fraction $fraction \
      --output "$out/atm_${target}_rerun$fraction.yaml" | grep '^chosen'
  done
done
cp "$out/atm_20_rerun0.1.yaml" "$out/atm_20.yaml"
cp "$out/atm_30_rerun0.1.yaml" "$out/atm_30.yaml"
cp "$out/atm_40_rerun0.05.yaml" "$out/atm_40.yaml"
atm calibrate --config configs/vit_t_dense.yaml --model.merger ATM --model.weights "$weights" \
  --data.root "$split" --target_reduction 0.3 --num_images 500 --output "$out/paper_30.yaml"  # the paper's options
ladder=("$out/atm_20.yaml" "$out/atm_30.yaml" "$out/atm_40.yaml")
common=(--config configs/vit_t.yaml --model.weights "$weights" --data.root "$split")
# ToMe with the same rerun share: its margins from its own top-2 gaps on the calibration half
tome14=$(python "$(dirname "$0")/rerun_margin.py" tome:r=14 --weights "$weights" --data-root "$split" --fraction 0.1 | tail -1)
tome16=$(python "$(dirname "$0")/rerun_margin.py" tome:r=16 --weights "$weights" --data-root "$split" --fraction 0.1 | tail -1)
# and ToMe with the class-token-only last block the ladder uses
atm compare "${common[@]}" --sweep --atm "$out/paper_30.yaml" "${ladder[@]}" \
  "tome:r=14,rerun_margin=$tome14" "tome:r=16,rerun_margin=$tome16" \
  "tome:r=10,last_block_prefix_only=true" "tome:r=13,last_block_prefix_only=true" --output "$out/held_out"
atm compare "${common[@]}" --data.eval_hflip true --tome_r 10 13 --atm "${ladder[@]}" --output "$out/held_out_flipped"
atm compare "${common[@]}" --data.crop_pct 1.0 --tome_r 10 13 --atm "${ladder[@]}" --output "$out/held_out_crop1"
