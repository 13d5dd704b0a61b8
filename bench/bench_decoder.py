#!/usr/bin/env python3
"""KL decode: the engine (gst-vae-decode-file) against PyTorch eager doing what ComfyUI's VAE.decode and
SaveImage do, on the same random weights of the full released decoder architecture (ch 128, mult 1,2,4,4,
3 ResnetBlocks per level, z=4, post_quant_conv), fp32 on the CPU. Printed, never asserted.

  scripts/python bench/bench_decoder.py            # 256x256 frames (32x32 latents), 2 frames, batch 1

Both sides: latents (float32, host) -> post_quant_conv + Decoder -> clamp((x+1)/2) -> x255, clip, uint8.
The engine's time is what gst-vae-decode-file reports for its decode loop (after one untimed warm-up batch,
model load excluded); PyTorch's is the same loop after one warm-up, under inference_mode.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import vae_reference as V  # noqa: E402


def attn_block_sdpa(state, name, x):
    """The VAE's single-head attention as ComfyUI's pytorch_attention computes it."""
    h = V._norm(state, name + ".norm", x)
    q, k, v = (V._conv(state, name + "." + p, h) for p in "qkv")
    b, c, hh, ww = q.shape
    q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(2, 3).contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return x + V._conv(state, name + ".proj_out", out.transpose(2, 3).reshape(b, c, hh, ww))


def comfy_decode(state, arch, z):
    """VAE.decode for one sub-batch, then SaveImage's bytes."""
    x = V.decoder_forward(state, z, arch)
    pixels = torch.clamp((x + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1).cpu()
    return (255.0 * pixels).clamp(0, 255).to(torch.uint8).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="output frame size (latents size/8)")
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tool", default=os.path.join(ROOT, "build", "tools", "gst-vae-decode-file"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if hasattr(F, "scaled_dot_product_attention"):
        V.attn_block = attn_block_sdpa

    tmp = tempfile.mkdtemp(prefix="gstvae-bench-dec-")
    model = os.path.join(tmp, "sd-vae-decoder-untrained.safetensors")
    _, dec = V.make_checkpoint(model, layout="ldm", ch=128, mult=(1, 2, 4, 4), blocks=2, z=4, seed=0,
                               include_encoder=False, return_decoder=True)
    arch = V.infer_decoder_arch(dec)
    h = args.size // 8
    lat = torch.randn((args.frames, 4, h, h), generator=torch.Generator().manual_seed(1)).numpy().astype(np.float32)
    lpath = os.path.join(tmp, "latents.npy")
    np.save(lpath, lat)
    print("KL decode %dx%d, %d frames, batch %d, fp32, CPU %d threads, torch %s; decoder %s, %.1f M parameters"
          % (args.size, args.size, args.frames, args.batch, args.threads, torch.__version__, arch,
             sum(t.numel() for t in dec.values()) / 1e6), flush=True)

    out = os.path.join(tmp, "frames.rgb")
    p = subprocess.run([args.tool, "--model", model, "--latents", lpath, "--out", out, "--device", "cpu",
                        "--precision", "fp32", "--per-batch", str(args.batch), "--threads", str(args.threads),
                        "--warmup"], stderr=subprocess.PIPE, check=True)
    m = re.search(r"\(([\d.]+) frames/s\)", p.stderr.decode())
    engine = float(m.group(1))
    engine_u8 = np.fromfile(out, dtype=np.uint8).reshape(args.frames, args.size, args.size, 3)

    state = {k: v.float() for k, v in dec.items()}
    z = torch.from_numpy(lat)
    with torch.inference_mode():
        comfy_decode(state, arch, z[:args.batch])  # warm-up
        start = time.perf_counter()
        parts = [comfy_decode(state, arch, z[i:i + args.batch]) for i in range(0, args.frames, args.batch)]
        python = args.frames / (time.perf_counter() - start)
    py_u8 = np.concatenate(parts)
    diff = np.abs(engine_u8.astype(int) - py_u8.astype(int))
    print("PyTorch eager (ComfyUI): %.3f frames/s" % python)
    print("engine:                  %.3f frames/s" % engine)
    print("ratio engine / PyTorch:  %.2fx   (bytes: %.3f%% differ, max %d level)" % (
        engine / python, 100.0 * np.mean(diff > 0), int(diff.max())))


if __name__ == "__main__":
    main()
