#!/usr/bin/env bash
# The Cheers-Shapes recipe (docs/shapes.md): the shipped examples/cheers-shapes model, from nothing, on a CPU.
#
#   bash examples/train_shapes.sh [RUN_DIR] [EXPORT_DIR]      # defaults: runs/cheers-shapes, RUN_DIR/model
#
# 0. data: the synthetic world (python -m transformers_cheers.shapes);
# 1. examples/train_vae.py: a new model (tokenizer trained on the data's text, `shapes` preset), its VAE trained as an
#    autoencoder, latent statistics, decoder projector copied from the decoder, VAE frozen;
# 1b. examples/train_vae.py --part projector: the decoder projector tuned so that its decoding of x_t shows the noise
#    the denoiser must remove (a decoder trained on clean drawings alone hides it), its clean decodings kept;
# 1c. examples/train_vae.py --part vision: SigLIP and the token merger trained on the data's image-caption pairs with
#    SigLIP's sigmoid loss, as Cheers starts from a pretrained SigLIP2 (in the mixed stage alone the small SigLIP
#    learns colour and position but hardly shape);
# 2. examples/train_lora.py --full --stage scratch: everything but the VAE, decoder projector and SigLIP, on the mixed
#    understanding / generation / editing data, with the official objective (t of the generation targets drawn on
#    the sampler's shifted grid, TIMESTEP_SHIFT); data-parallel over PROCESSES processes
#    of one thread each (accelerate, gloo): on a small model a 2-thread process stalls whenever another job takes a
#    core, while single-thread processes only share it;
# 3. examples/train_lora.py --full --stage scratch again, from stage 2's model: a short tail on every generation sample,
#    the first TAIL_UNDERSTANDING understanding and TAIL_EDITING editing samples, at a lower learning rate
#    (TAIL_LEARNING_RATE). After stage 2 the model draws the colour words but ignores the position words; this tail
#    makes it draw where it is asked while the understanding and editing samples keep its answers and its edits in
#    place (docs/shapes.md, "Why drawing fails");
# 4. export: the final folder plus the world card (with the sampling settings the model is meant to use).
# Sizes and steps can be overridden from the environment (e.g. SFT_STEPS=20 for a smoke run). Both training stages
# checkpoint every few hundred steps; rerunning this script resumes a stage from its newest checkpoint.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="${1:-runs/cheers-shapes}"
EXPORT="${2:-$RUN/model}"
PYTHON="${PYTHON:-python}"
NUM_GENERATION="${NUM_GENERATION:-12000}"
NUM_UNDERSTANDING="${NUM_UNDERSTANDING:-10000}"
NUM_EDITING="${NUM_EDITING:-6000}"
VAE_STEPS="${VAE_STEPS:-900}"
PROJECTOR_STEPS="${PROJECTOR_STEPS:-1000}"
VISION_STEPS="${VISION_STEPS:-2000}"
SFT_STEPS="${SFT_STEPS:-3400}"
TAIL_STEPS="${TAIL_STEPS:-600}"
TAIL_UNDERSTANDING="${TAIL_UNDERSTANDING:-5000}"
TAIL_EDITING="${TAIL_EDITING:-3000}"
TAIL_LEARNING_RATE="${TAIL_LEARNING_RATE:-5e-4}"  # half of stage 2's, re-warmed (docs/shapes.md, stage 3)
TIMESTEP_SHIFT="${TIMESTEP_SHIFT:-0.5}"  # t drawn on the sampler's grid: more steps where the prompt sets the layout
SFT_BATCH="${SFT_BATCH:-16}"  # per process
PROCESSES="${PROCESSES:-2}"
DEFAULT_SAMPLING='{"num_inference_steps": 20, "guidance_scale": 3.0}'
SAMPLING="${SAMPLING:-$DEFAULT_SAMPLING}"

resume_flag() {  # --resume latest when the stage has a checkpoint
  if compgen -G "$1/checkpoint-*" > /dev/null; then echo "--resume latest"; fi
}

stage_time() { echo "[train_shapes] $1: $(( SECONDS - $2 )) s (wall clock)"; }

start=$SECONDS
if [ ! -f "$RUN/data/train.jsonl" ]; then
  "$PYTHON" -m transformers_cheers.shapes --output "$RUN/data" --num-generation "$NUM_GENERATION" \
    --num-understanding "$NUM_UNDERSTANDING" --num-editing "$NUM_EDITING" --overwrite
fi
stage_time data "$start"

start=$SECONDS
if [ ! -f "$RUN/vae/final/config.json" ]; then
  # shellcheck disable=SC2046
  "$PYTHON" "$HERE/train_vae.py" --data "$RUN/data/train.jsonl" --output-dir "$RUN/vae" --max-steps "$VAE_STEPS" \
    --batch-size 16 --learning-rate 3e-3 --checkpoint-every 100 --checkpoints-total-limit 1 --quiet \
    $(resume_flag "$RUN/vae")
fi
stage_time "stage 1 (VAE)" "$start"

start=$SECONDS
if [ ! -f "$RUN/projector/final/config.json" ]; then
  # shellcheck disable=SC2046
  "$PYTHON" "$HERE/train_vae.py" --part projector --model "$RUN/vae/final" --data "$RUN/data/train.jsonl" \
    --output-dir "$RUN/projector" --max-steps "$PROJECTOR_STEPS" --batch-size 32 --learning-rate 1e-3 \
    --visibility-weight 1.0 --timestep-shift "$TIMESTEP_SHIFT" --checkpoint-every 250 --checkpoints-total-limit 1 \
    --quiet $(resume_flag "$RUN/projector")
fi
stage_time "stage 1b (decoder projector)" "$start"

start=$SECONDS
if [ ! -f "$RUN/vision/final/config.json" ]; then
  # shellcheck disable=SC2046
  "$PYTHON" "$HERE/train_vae.py" --part vision --model "$RUN/projector/final" --data "$RUN/data/train.jsonl" \
    --output-dir "$RUN/vision" --max-steps "$VISION_STEPS" --batch-size 64 --learning-rate 1e-3 \
    --checkpoint-every 500 --checkpoints-total-limit 1 --quiet $(resume_flag "$RUN/vision")
fi
stage_time "stage 1c (SigLIP)" "$start"

launch=("$PYTHON")  # one process (all cores); several: accelerate's launcher (DDP over gloo, see docs/training.md)
if [ "$PROCESSES" -gt 1 ]; then
  launch=(env OMP_NUM_THREADS=1 "$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$PROCESSES"
    --num_machines 1 --mixed_precision no --dynamo_backend no)
fi
train_rest() {  # MODEL DATA OUTPUT STEPS LEARNING_RATE: everything but the VAE, decoder projector and SigLIP
  # shellcheck disable=SC2046
  "${launch[@]}" "$HERE/train_lora.py" --cpu --full --stage scratch --model "$1" --data "$2" --output-dir "$3" \
    --max-steps "$4" --batch-size "$SFT_BATCH" --learning-rate "$5" --timestep-shift "$TIMESTEP_SHIFT" \
    --lr-scheduler cosine --warmup-ratio 0.03 --no-gradient-checkpointing --checkpoint-every 250 \
    --checkpoints-total-limit 1 --report-to none --quiet $(resume_flag "$3")
}

start=$SECONDS
if [ ! -f "$RUN/sft/final/config.json" ]; then
  train_rest "$RUN/vision/final" "$RUN/data/train.jsonl" "$RUN/sft" "$SFT_STEPS" 1e-3
fi
stage_time "stage 2 (scratch)" "$start"

start=$SECONDS
if [ ! -f "$RUN/tail/final/config.json" ]; then
  cat "$RUN/data/generation.jsonl" <(head -n "$TAIL_UNDERSTANDING" "$RUN/data/understanding.jsonl") \
    <(head -n "$TAIL_EDITING" "$RUN/data/editing.jsonl") > "$RUN/data/tail.jsonl"
  train_rest "$RUN/sft/final" "$RUN/data/tail.jsonl" "$RUN/tail" "$TAIL_STEPS" "$TAIL_LEARNING_RATE"
fi
stage_time "stage 3 (generation tail)" "$start"

"$PYTHON" - "$RUN/tail/final" "$EXPORT" "$SAMPLING" <<'EOF'
import json, shutil, sys
from pathlib import Path

from transformers_cheers.shapes import write_world_card

source, target, sampling = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
target.mkdir(parents=True, exist_ok=True)
for path in source.iterdir():  # the model, tokenizer, processor and generation config; not the remote-code copies
    if path.is_file() and path.suffix != ".py":
        shutil.copy2(path, target / path.name)
write_world_card(target, sampling=sampling)
print(f"Exported {target} (sampling: {sampling})")
EOF
