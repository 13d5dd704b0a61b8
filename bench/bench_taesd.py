#!/usr/bin/env python3
"""The TAESD tiny autoencoders (real weights from ../shared/models): the engine
against PyTorch eager doing what ComfyUI's TAESD VAE does, encode and decode,
fp32 on the CPU, printed as ratios measured in the same run (never asserted).

  scripts/python bench/bench_taesd.py                  # taesd, 256² and 512², batches 1 and 4
  scripts/python bench/bench_taesd.py --sizes 256 --batches 1 --model taesdxl

Engine: gst-vae-engine-bench (encode: 8-bit frames in, latents on the host;
serial column) and gst-vae-decode-file --warmup (decode: latents in, 8-bit
frames out), one warm-up batch each, model load excluded. Eager: the float64
reference's layers (tests/python/taesd_reference.py) in float32 under
inference_mode, on the tensor ComfyUI builds: uint8 / 255, movedim to NCHW
(which leaves channels-last strides, as ComfyUI's does), encoder, / scale +
shift; decode: (raw - shift) * scale, decoder, clamp, x255, uint8. Batch 1 is
the live case: its ms/frame is the per-frame latency of the model step.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import taesd_reference as R  # noqa: E402

MODELS = os.path.join(os.path.dirname(ROOT), "shared", "models")


def eager_rate(fn, inputs, iters):
    with torch.inference_mode():
        fn(inputs)  # warm-up
        start = time.perf_counter()
        for _ in range(iters):
            fn(inputs)
        return iters * inputs.shape[0] / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="taesd")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    enc_path = os.path.join(MODELS, "%s_encoder.safetensors" % args.model)
    dec_path = os.path.join(MODELS, "%s_decoder.safetensors" % args.model)
    scale, shift, channels = R.LATENT_SPACES[args.model]
    enc_state = {k: v.float() for k, v in R.load_state(enc_path)[0].items()}
    dec_state = {k: v.float() for k, v in R.load_state(dec_path)[0].items()}
    bench_tool = os.path.join(args.build, "bench", "gst-vae-engine-bench")
    decode_tool = os.path.join(args.build, "tools", "gst-vae-decode-file")
    tmp = tempfile.mkdtemp(prefix="gstvae-bench-taesd-")
    print("%s, fp32, CPU, %d threads, torch %s" % (args.model, args.threads, torch.__version__))
    print("%-7s %-5s %5s %14s %14s %7s %14s" % ("step", "size", "batch", "eager frames/s", "engine frames/s",
                                                "ratio", "engine ms/frame"))

    def comfy_encode(u8):
        x = u8.float().div(255.0).movedim(-1, 1)  # channels-last strides, as in ComfyUI
        return R.encoder_forward(enc_state, x) / scale + shift

    def comfy_decode(raw):
        x = R.decoder_forward(dec_state, (raw - shift) * scale)
        return (255.0 * x.clamp(0, 1).movedim(1, -1)).clamp(0, 255).to(torch.uint8)

    for size in [int(s) for s in args.sizes.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            frames = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(1))
            eager = eager_rate(comfy_encode, frames, args.iters)
            p = subprocess.run([bench_tool, enc_path, "--size", str(size), "--batches", str(batch), "--precisions",
                                "fp32", "--device", "cpu", "--iters", str(args.iters), "--threads",
                                str(args.threads)], capture_output=True, text=True, check=True)
            row = [l for l in p.stdout.splitlines() if re.match(r"^%d\s+fp32\s+%d\s" % (size, batch), l)][0]
            engine = float(row.split()[4])
            print("%-7s %-5d %5d %14.2f %14.2f %6.2fx %14.1f" % ("encode", size, batch, eager, engine,
                                                                engine / eager, 1000.0 / engine), flush=True)

            latents = torch.randn((batch, channels, size // 8, size // 8), generator=torch.Generator().manual_seed(2))
            eager = eager_rate(comfy_decode, latents, args.iters)
            npy = os.path.join(tmp, "lat.npy")
            np.save(npy, np.concatenate([latents.numpy()] * args.iters).astype(np.float32))
            p = subprocess.run([decode_tool, "--model", dec_path, "--latents", npy, "--out", os.path.join(tmp, "o"),
                                "--device", "cpu", "--precision", "fp32", "--per-batch", str(batch), "--threads",
                                str(args.threads), "--warmup"], capture_output=True, text=True, check=True)
            engine = float(re.search(r"\(([\d.]+) frames/s\)", p.stderr).group(1))
            print("%-7s %-5d %5d %14.2f %14.2f %6.2fx %14.1f" % ("decode", size, batch, eager, engine,
                                                                engine / eager, 1000.0 / engine), flush=True)


if __name__ == "__main__":
    main()
