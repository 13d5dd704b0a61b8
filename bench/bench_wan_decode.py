#!/usr/bin/env python3
"""Wan 2.1 video VAE decode: the engine's streaming decode (gst-vae-decode-file, a video session fed B latents
at a time, as vaedecode does) against PyTorch eager doing what the official WanVAE.decode does (one latent per
call, one feature cache: tests/python/wan_reference.py's decode_chunked) in float32 on the CPU, on the same
random weights of the full-size decoder (width 384 = dim 96, z 16, official layout, F32). Printed as ratios
measured in the same run, never asserted; also the stream state per output pixel, the engine's against the
eager feature cache's.

  scripts/python bench/bench_wan_decode.py                 # 128x128 and 256x256 output, 3 latents (9 frames)
  scripts/python bench/bench_wan_decode.py --sizes 256:5 --per-batch 2 --repeats 3

Latents: smooth random latents (seeded), the same for both sides. Engine: its own timing (model load, probe
and a warm-up batch in a session of its own excluded). Eager: from the latents to the clamped [-1, 1] frames,
weights loaded. Each size is measured --repeats times, the sides alternating, the best of each kept; the
frames are checked to agree (rel <= 1e-4 on ComfyUI's [0, 1] pixels).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import wan_reference as R  # noqa: E402
import wan_weights as W  # noqa: E402


def smooth_latents(t, h, w, z=16, seed=0):
    """t x z x h x w float32: Gaussian noise blurred over 3x3 cells, std about 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, z, h + 2, w + 2, generator=g)
    x = F.avg_pool2d(x, 3, stride=1) * 3.0
    return x.numpy().astype(np.float32)


def eager_decode(state, latents):
    """t x z x h x w raw latents -> (frames 1 x 3 x F x H x W in [-1, 1], feature cache bytes at the end)."""
    z = torch.from_numpy(latents).permute(1, 0, 2, 3).unsqueeze(0)
    arch = R.decoder_arch(state)
    x = F.conv3d(z, state["conv2.weight"], state["conv2.bias"])
    cache = R.FeatCache()
    outs = [R._decoder_body(cache, state, arch, x[:, :, i:i + 1], first=(i == 0)) for i in range(z.shape[2])]
    frames = R._decode_finish(arch, torch.cat(outs, dim=2))
    held = sum(t.numel() * t.element_size() for t in cache.slots.values() if isinstance(t, torch.Tensor))
    return frames, held


def run_engine(args, model, latents_path, out):
    p = subprocess.run([args.tool, "--model", model, "--latents", latents_path, "--out", out, "--float",
                        "--per-batch", str(args.per_batch), "--device", "cpu", "--precision", "fp32",
                        "--threads", str(args.threads), "--warmup"],
                       stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    if p.returncode != 0:
        sys.exit("gst-vae-decode-file failed:\n" + p.stderr)
    m = re.search(r"decoded (\d+) latents to (\d+) frames of .* in ([\d.e+-]+) s .*stream state (\d+) bytes",
                  p.stderr)
    if not m:
        sys.exit("unexpected gst-vae-decode-file output:\n" + p.stderr)
    return float(m.group(3)), int(m.group(2)), int(m.group(4))


def loadavg():
    try:
        return "%.1f" % os.getloadavg()[0]
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128:3,256:3", help="OUTPUT_SIZE:LATENTS,... (default 128:3,256:3)")
    ap.add_argument("--per-batch", type=int, default=3, help="latents per engine batch (default 3)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dim", type=int, default=96, help="decoder base width (96 = the released Wan 2.1)")
    ap.add_argument("--tool", default=os.path.join(ROOT, "build", "tools", "gst-vae-decode-file"))
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="gstvae-bench-wan-decode-")
    try:
        run(args, sizes, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, sizes, tmp):
    model = os.path.join(tmp, "wan21-untrained.safetensors")
    # A narrow encoder (unused here) keeps the file small; the decoder is full width.
    stored = W.make_checkpoint(model, variant="2.1", dim=4, z=16, layout="official", dtype="F32", seed=0,
                               decoder_dim=args.dim)
    state = {k: v.float() for k, v in stored.items() if k.startswith("decoder.") or k.startswith("conv2.")}
    params = sum(t.numel() for t in state.values())
    print("Wan 2.1 decoder, random weights, dim %d z 16 (%.1f M parameters, official layout, F32); fp32, CPU, "
          "%d threads, torch %s; engine per-batch %d; best of %d, alternating; load average %s"
          % (args.dim, params / 1e6, args.threads, torch.__version__, args.per_batch, args.repeats, loadavg()),
          flush=True)
    rows = []
    for size, t in sizes:
        latents = smooth_latents(t, size // 8, size // 8, seed=size)
        lpath = os.path.join(tmp, "latents-%d.npy" % size)
        np.save(lpath, latents)
        out = os.path.join(tmp, "frames-%d.f32" % size)
        engine_s, eager_s = [], []
        frames = held = engine_state = count = None
        for rep in range(args.repeats):
            for side in (("engine", "eager") if rep % 2 == 0 else ("eager", "engine")):
                if side == "engine":
                    sec, count, engine_state = run_engine(args, model, lpath, out)
                    engine_s.append(sec)
                else:
                    with torch.inference_mode():
                        start = time.perf_counter()
                        frames, held = eager_decode(state, latents)
                        eager_s.append(time.perf_counter() - start)
                print("  %dx%d x %d latents, round %d, %-6s %7.1f s  (load average %s)"
                      % (size, size, t, rep + 1, side, (engine_s if side == "engine" else eager_s)[-1], loadavg()),
                      flush=True)
        ref = ((frames[0].permute(1, 0, 2, 3) + 1.0) / 2.0).clamp(0.0, 1.0).numpy()
        eng = np.fromfile(out, dtype=np.float32)
        rel = float(np.abs(eng.reshape(ref.shape) - ref).max() / np.abs(ref).max()) if eng.size == ref.size \
            else float("inf")
        rows.append((size, t, count, count / min(engine_s), count / min(eager_s), rel, engine_state, held))
        if not rel <= 1e-4:
            print("  WARNING: frames differ (rel %.2e): the two sides did not do the same work" % rel)
    print()
    print("%-9s %7s %6s %15s %15s %7s %9s %14s %14s" % ("size", "latents", "frames", "eager frames/s",
                                                       "engine frames/s", "ratio", "rel diff", "engine B/pixel",
                                                       "eager B/pixel"))
    for size, t, count, eng, eag, rel, es, cb in rows:
        print("%-9s %7d %6d %15.3f %15.3f %6.2fx %9.1e %14.1f %14.1f" % (
            "%dx%d" % (size, size), t, count, eag, eng, eng / eag, rel, es / size ** 2, cb / size ** 2))
    print("(ratio = engine / eager; B/pixel: stream state per output pixel after the clip, fp32; the engine's"
          " from its session,\n the eager one the official feature cache)")


if __name__ == "__main__":
    main()
