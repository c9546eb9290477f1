#!/usr/bin/env bash
# Rebuild the bundled tabletop-tiny model from scratch on a CPU (about 7 hours on 2 cores).
# See lisa_agent/assets/tabletop-tiny/MODEL_CARD.md for what exactly the shipped weights went through.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/tabletop}
LA=${LA:-.venv/bin/lisa-agent}
SIZES=192x256,256x192,224x224,240x320,320x240
mkdir -p "$OUT"
# random init: LLaMA 192x2, CLIP 112 px, SAM 256 px / 128 wide; tokenizer trained on the tabletop queries
$LA make-tiny "$OUT/init" --shape tabletop --seed 0
$LA make-data --out "$OUT/val" --n 24 --split val --format png
# stage 1: LISA's answers ("Sure, [SEG]." and its templates): the model learns objects and the answers' text
$LA finetune --model "$OUT/init" --data synthetic --out "$OUT/stage1" --full --steps 3750 --lr 1e-3 \
    --warmup 100 --scenes-per-batch 2 --frame-sizes $SIZES --val-data "$OUT/val" --val-every 1000 \
    --val-limit 24 --save-every 250 --seed 0 --no-progress
# stage 2: answers that name the target before [SEG] (75%), fresh [SEG] head (its ReLUs died in stage 1)
$LA finetune --model "$OUT/stage1" --data synthetic --out "$OUT/stage2" --full --reinit-seg-head \
    --named-answers 0.75 --steps 10000 --lr 1e-3 --warmup 100 --scenes-per-batch 2 --frame-sizes $SIZES \
    --val-data "$OUT/val" --val-every 1000 --val-limit 24 --val-answer generated --save-every 250 \
    --seed 100000 --no-progress
# stage 3: name targets by category (colour only when the category repeats), two no-target queries and
# one "list the objects" question per scene
$LA finetune --model "$OUT/stage2" --data synthetic --out "$OUT/stage3" --full --named-answers 0.75 \
    --named-colour needed --no-target-per-scene 2 --describe-per-scene 1 --steps 7000 --lr 5e-4 --warmup 200 \
    --scenes-per-batch 2 --frame-sizes $SIZES --val-data "$OUT/val" --val-every 3500 --val-limit 24 \
    --val-answer generated --save-every 500 --seed 600000 --no-progress
# stage 4: the same data, 10,000 more steps (the masks were still improving)
$LA finetune --model "$OUT/stage3" --data synthetic --out "$OUT/stage4" --full --named-answers 0.75 \
    --named-colour needed --no-target-per-scene 2 --describe-per-scene 1 --steps 10000 --lr 4e-4 --warmup 200 \
    --scenes-per-batch 2 --frame-sizes $SIZES --val-data "$OUT/val" --val-every 2500 --val-limit 24 \
    --val-answer generated --save-every 500 --seed 700000 --no-progress
# stage 5: the presence gate. Three more no-target queries per scene answered with a [SEG] marked absent
# train the mask decoder's score output to say whether the target is there; three runs, lr falling.
GATE="--named-answers 0.75 --named-colour needed --no-target-per-scene 2 --describe-per-scene 1 \
    --absent-seg-per-scene 3 --scenes-per-batch 2 --frame-sizes $SIZES --save-every 500 --threads 1 --no-progress"
$LA finetune --model "$OUT/stage4" --data synthetic --out "$OUT/stage5a" --full $GATE --presence-weight 1 \
    --steps 4000 --lr 3e-4 --warmup 100 --seed 800000
$LA finetune --model "$OUT/stage5a" --data synthetic --out "$OUT/stage5b" --full $GATE --presence-weight 2 \
    --steps 4000 --lr 2e-4 --warmup 50 --seed 1200000
$LA finetune --model "$OUT/stage5b" --data synthetic --out "$OUT/stage5" --full $GATE --presence-weight 1 \
    --steps 3500 --lr 1e-4 --warmup 50 --seed 1400000
# stage 6: SAM at 512 px instead of 256 (a 32 x 32 image grid instead of 16 x 16: finer boundaries, and
# the presence head sees shapes better); position terms resampled, then the gate recipe again
$LA resize-sam --model "$OUT/stage5" --out "$OUT/stage6-init" --size 512
$LA finetune --model "$OUT/stage6-init" --data synthetic --out "$OUT/stage6" --full $GATE --threads 2 \
    --presence-weight 1 --steps 10500 --lr 3e-4 --warmup 100 --seed 2000000
# stage 7: 5,000 more steps of the same recipe at a third of the learning rate (the Dice loss was still falling)
$LA finetune --model "$OUT/stage6" --data synthetic --out "$OUT/stage7" --full $GATE --threads 2 \
    --presence-weight 1 --steps 5000 --lr 1e-4 --warmup 50 --seed 2400000
# the model declares its mask test-time augmentation (SAM also reads the mirrored frames: the tabletop camera
# looks down), and the gate's threshold is chosen with it, on 260 validation scenes: the one that keeps the
# most targets while declining at least 92% of the no-target queries (the project's bar is 90% on a held-out
# split of 60 such queries, where one query is 1.7 points: 2 points of margin)
python3 - "$OUT/stage7/config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["lisa_agent"]["mask_tta"] = "flips"
json.dump(config, open(sys.argv[1], "w"), indent=2)
PY
$LA make-data --out "$OUT/val260" --n 60 --split val --seed 1000 --size 240x320 --format png
$LA make-data --out "$OUT/val260" --n 200 --split val --seed 2000 --size 240x320 --format png
$LA calibrate-gate --model "$OUT/stage7" --data "$OUT/val260" --min-decline 0.92 --write
$LA make-data --out "$OUT/test" --n 60 --split test --size 240x320 --format png
$LA eval --model "$OUT/stage7" --data "$OUT/test" --answer generated --json > "$OUT/test_generated.json"
$LA eval --model "$OUT/stage7" --data "$OUT/test" --answer forced --json > "$OUT/test_forced.json"
