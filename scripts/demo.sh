#!/usr/bin/env bash
# The demo: install, build, then encode a short test clip with vaeencode.
#   bash scripts/demo.sh                                   # untrained stand-in model
#   MODEL=/path/to/vae.safetensors bash scripts/demo.sh    # a real VAE
# Optional: FRAMES (default 8), SIZE (default 256x256), PER_BATCH (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "Installing what is missing and building (the first run downloads PyTorch, about 2.7 GB, and takes minutes)..."
bash scripts/build.sh >/dev/null
export GST_PLUGIN_PATH="$PWD/build/gst${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"

frames=${FRAMES:-8}
size=${SIZE:-256x256}
width=${size%x*}
height=${size#*x}
per_batch=${PER_BATCH:-4}
mkdir -p demo-out
out="$PWD/demo-out/latents.latent"

model=${MODEL:-}
if [ -z "$model" ]; then
  model="$PWD/demo-out/sd-vae-untrained.safetensors"
  if [ ! -f "$model" ]; then
    echo "No MODEL given: generating a checkpoint with the full SD VAE encoder architecture"
    echo "(width 128, levels 1,2,4,4, 2 blocks, z=4, quant_conv) and RANDOM weights."
    scripts/python tests/python/vae_reference.py make-checkpoint --out "$model" --layout ldm \
      --ch 128 --mult 1,2,4,4 --blocks 2 --z 4 --dtype F32 --seed 0 --no-decoder >/dev/null
  fi
  echo "NOTE: $model is UNTRAINED (random weights): the pipeline, shapes and speed are real,"
  echo "      the latent values are meaningless. Set MODEL=/path/to/vae.safetensors for real latents."
fi

echo "Encoding $frames frames of ${width}x${height} (videotestsrc) in batches of $per_batch with $model"
log=$(gst-launch-1.0 -m videotestsrc num-buffers="$frames" pattern=ball \
  ! "video/x-raw,format=RGB,width=$width,height=$height,framerate=25/1" \
  ! vaeencode model="$model" per-batch="$per_batch" \
  ! latentfilesink location="$out" 2>&1) || { echo "$log" | tail -20; exit 1; }

fps=$(echo "$log" | grep vaeencode-progress | tail -1 | sed -n 's/.*average-fps=(double)\([0-9.]*\).*/\1/p')
shape=$(build/tools/gst-vae-latent-info "$out" | sed -n 's/^shape //p')
echo "Latent shape: $shape"
echo "Speed:        ${fps:-?} frames/s (encode time, $(nproc) CPU threads)"
echo "Output:       $out (ComfyUI .latent: load it with Load Latent, or see docs/latent-files.md)"
