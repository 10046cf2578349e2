#!/usr/bin/env bash
# The ladder's 30 and 40% points on another random half of the images, to see how much a
# held-out figure moves with the split:
#   bash tools/holdout_another_split.sh IMAGES WEIGHTS OUT SEED
# As tools/holdout_protocol.sh, but with the split's SEED and calibrate's default rerun fraction
# (0.1 at 30%, 0.05 at 40%: what the protocol's grid chose); reports ToMe r=10 and 13 beside them
# on the other half as it is, mirrored and with the full image as crop. ~25 min on 2 CPU cores.
set -euo pipefail
images=$1 weights=$2 out=$3 seed=$4
split=$out/split
python "$(dirname "$0")/holdout_split.py" "$images" "$split" --fraction 0.5 --seed "$seed"
for target in 30 40; do
  atm calibrate --config configs/vit_t_dense.yaml --model.weights "$weights" --data.root "$split" \
    --target_reduction 0.$target --num_images 500 --output "$out/atm_$target.yaml" | grep '^chosen'
done
common=(--config configs/vit_t.yaml --model.weights "$weights" --data.root "$split" --tome_r 10 13
        --atm "$out/atm_30.yaml" "$out/atm_40.yaml")
atm compare "${common[@]}" --output "$out/held_out"
atm compare "${common[@]}" --data.eval_hflip true --output "$out/held_out_flipped"
atm compare "${common[@]}" --data.crop_pct 1.0 --output "$out/held_out_crop1"
