#!/usr/bin/env python3
"""Wan 2.1 video VAE encode: the engine's streaming encode (gst-vae-encode-file) against PyTorch eager doing
what the official WanVAE.encode does on the whole clip, fp32 on the CPU, on the same random weights of the
full-size encoder (dim 96, z 16, official layout, F32). Printed as ratios measured in the same run, never
asserted; also the engine's stream state against the note's figure (shared/notes/video-vae-semantics.md,
"Cost and streaming state": 5,616 B per input pixel in fp32, 1.37 GiB at 512x512).

  scripts/python bench/bench_wan.py            # 256x256 x 9 and 512x512 x 5 frames (27 min at load average 4-7)
  scripts/python bench/bench_wan.py --quick    # 128x128 x 9 and 256x256 x 5 frames (4 min at load average 3)
  scripts/python bench/bench_wan.py --sizes 256:9 --per-batch 8 --repeats 3

Frames: a pan/zoom over the astronaut photo (../shared/media), the same uint8 frames for both sides.
Engine: `gst-vae-encode-file --per-batch B` (a session fed B frames at a time, as the element does; frame 0
alone, then groups of 4); its own timing (model load and probe excluded, its frame-0 pass included), and
its "stream state" line. Eager: tests/python/wan_reference.py's feature-cache formulation (frame 0 alone,
then chunks of 4, every causal conv an F.conv3d over [its cached frames, the chunk]: the official
encode's computation) run in float32 under inference_mode, timed from the uint8 frames to the raw mean,
weights already loaded. Each size is measured --repeats times, engine and eager alternating (the order
flips each round), and the best of each is kept; the latents are checked to agree (rel <= 1e-4).
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

MEDIA = os.path.join(os.path.dirname(ROOT), "shared", "media")
NOTE_BYTES_PER_PIXEL = 5616  # Wan 2.1, fp32 (the note's table)
NOTE_GIB_512 = 1.37


def pan_frames(n, size):
    """n x size x size x 3 uint8: frame i crops a square of side round(512 (0.80 - 0.015 i)) of the 512x512
    astronaut at x0 = round((512-s)(0.15+0.04 i)), y0 = round((512-s)(0.30+0.02 i)) (the pan of
    ../shared/media/README.md), resized to size with antialiased bilinear."""
    src = np.fromfile(os.path.join(MEDIA, "astronaut-512x512.rgb"), dtype=np.uint8).reshape(512, 512, 3)
    img = torch.from_numpy(src).permute(2, 0, 1).float().unsqueeze(0)
    out = []
    for i in range(n):
        s = round(512 * (0.80 - 0.015 * i))
        x0, y0 = round((512 - s) * (0.15 + 0.04 * i)), round((512 - s) * (0.30 + 0.02 * i))
        crop = img[:, :, y0:y0 + s, x0:x0 + s]
        r = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(r[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0))
    return torch.stack(out).numpy()


def eager_encode(state, frames_u8):
    """uint8 T x H x W x 3 -> raw mean 1 x z x T_lat x h x w (float32), and the feature cache's bytes at the
    end: wan_reference.encode_chunked with the official plan, keeping its FeatCache."""
    x = torch.from_numpy(frames_u8).to(torch.float32).div_(255.0).mul_(2.0).sub_(1.0)
    x = x.permute(3, 0, 1, 2).unsqueeze(0)  # 1 x 3 x T x H x W, as the official pipeline holds it
    arch, x = R.prepare_input(state, x)
    _, levels = R.level_plan(state)
    cache = R.FeatCache()
    outs, pos = [], 0
    for size in R.official_plan(x.shape[2]):
        outs.append(cache.encoder(state, arch, levels, x[:, :, pos:pos + size]))
        pos += size
    mean = R.vae_conv1(state, torch.cat(outs, dim=2), arch["z"])
    return mean, sum(t.numel() * t.element_size() for t in cache.slots.values())


def run_engine(args, model, frames_path, n, size, out):
    p = subprocess.run([args.tool, "--model", model, "--frames", frames_path, "--n", str(n), "--width", str(size),
                        "--height", str(size), "--format", "RGB", "--per-batch", str(args.per_batch), "--out", out,
                        "--device", "cpu", "--precision", "fp32", "--threads", str(args.threads)],
                       stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    if p.returncode != 0:
        sys.exit("gst-vae-encode-file failed:\n" + p.stderr)
    m = re.search(r"encoded (\d+) frames to (\d+) latents .* in ([\d.e+-]+) s \(([\d.e+-]+) frames/s\)", p.stderr)
    s = re.search(r"stream state: (\d+) bytes at most \(([\d.e+-]+) bytes per input pixel\)", p.stderr)
    if not m:
        sys.exit("unexpected gst-vae-encode-file output:\n" + p.stderr)
    # A build older than EncodeSession::state_bytes() prints no state line.
    return float(m.group(3)), int(m.group(2)), (int(s.group(1)), float(s.group(2))) if s else None


def loadavg():
    try:
        return "%.1f" % os.getloadavg()[0]
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="SIZE:FRAMES,... (default 256:9,512:5; --quick 128:9,256:5)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--per-batch", type=int, default=4, help="frames per engine batch (default 4)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dim", type=int, default=96, help="encoder base width (96 = the released Wan 2.1)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one eager encode of the first size (torch.profiler, top ops)")
    ap.add_argument("--tool", default=os.path.join(ROOT, "build", "tools", "gst-vae-encode-file"))
    args = ap.parse_args()
    sizes = args.sizes or ("128:9,256:5" if args.quick else "256:9,512:5")
    sizes = [tuple(int(v) for v in s.split(":")) for s in sizes.split(",")]
    torch.set_num_threads(args.threads)

    tmp = tempfile.mkdtemp(prefix="gstvae-bench-wan-")
    try:
        run(args, sizes, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, sizes, tmp):
    model = os.path.join(tmp, "wan21-encoder-untrained.safetensors")
    stored = W.make_checkpoint(model, variant="2.1", dim=args.dim, z=16, layout="official", dtype="F32", seed=0)
    state = {k: v.float() for k, v in stored.items()}
    params = sum(t.numel() for t in state.values())
    print("Wan 2.1 encoder, random weights, dim %d z 16 (%.1f M parameters, official layout, F32); fp32, CPU, "
          "%d threads, torch %s; engine per-batch %d; best of %d, alternating; load average %s"
          % (args.dim, params / 1e6, args.threads, torch.__version__, args.per_batch, args.repeats, loadavg()),
          flush=True)

    rows = []
    for size, n in sizes:
        frames = pan_frames(n, size)
        fpath = os.path.join(tmp, "frames-%d-%d.rgb" % (size, n))
        frames.tofile(fpath)
        out = os.path.join(tmp, "latents-%d.f32" % size)
        engine_s, eager_s = [], []
        eager_mean = eager_state = engine_state = None
        for rep in range(args.repeats):
            for side in (("engine", "eager") if rep % 2 == 0 else ("eager", "engine")):
                if side == "engine":
                    sec, lat_count, engine_state = run_engine(args, model, fpath, n, size, out)
                    engine_s.append(sec)
                else:
                    with torch.inference_mode():
                        start = time.perf_counter()
                        eager_mean, eager_state = eager_encode(state, frames)
                        eager_s.append(time.perf_counter() - start)
                print("  %dx%d x %d frames, round %d, %-6s %7.1f s  (load average %s)"
                      % (size, size, n, rep + 1, side, (engine_s if side == "engine" else eager_s)[-1], loadavg()),
                      flush=True)
        ref = eager_mean[0].permute(1, 0, 2, 3).numpy()  # T_lat x z x h x w
        eng = np.fromfile(out, dtype=np.float32)
        rel = float(np.abs(eng.reshape(ref.shape) - ref).max() / np.abs(ref).max()) if eng.size == ref.size \
            else float("inf")
        rows.append((size, n, lat_count, n / min(engine_s), n / min(eager_s), rel, engine_state, eager_state))
        print("  %dx%d: ratio per round (same round, similar load): %s" % (
            size, size, ", ".join("%.2fx" % (b / a) for a, b in zip(engine_s, eager_s))), flush=True)
        if not rel <= 1e-4:
            print("  WARNING: latents differ (rel %.2e): the two sides did not do the same work" % rel)

    print()
    print("%-9s %6s %7s %15s %15s %7s %9s" % ("size", "frames", "latents", "eager frames/s", "engine frames/s",
                                              "ratio", "rel diff"))
    for size, n, lats, eng, eag, rel, _, _ in rows:
        print("%-9s %6d %7d %15.4f %15.4f %6.2fx %9.1e" % ("%dx%d" % (size, size), n, lats, eag, eng, eng / eag, rel))
    print("(ratio = engine / eager; goal >= 1.3x)")
    print()
    print("stream state (fp32); the note: %d B per input pixel, %.2f GiB at 512x512" % (NOTE_BYTES_PER_PIXEL,
                                                                                      NOTE_GIB_512))
    print("%-9s %6s %16s %10s %9s %-7s %18s %10s" % ("size", "frames", "engine bytes", "B/pixel", "vs note", "seen",
                                                    "eager cache bytes", "B/pixel"))
    steady_px = None
    for size, n, _, _, _, _, es, cb in rows:
        # The tool samples the state after each batch but the last (which ends the clip and resets it): the
        # steady state (2 frames per causal conv) shows only if frames 0..4 arrive before the last batch.
        steady = args.per_batch * (-(-n // args.per_batch) - 1) >= 5
        if es:
            vs = "%8.3fx" % (es[1] / NOTE_BYTES_PER_PIXEL) if args.dim == 96 else "%9s" % "-"  # the note: dim 96
            eng = "%16d %10.1f %s %-7s" % (es[0], es[1], vs, "steady" if steady else "frame 0")
            if steady:
                steady_px = es[1]
        else:
            eng = "%16s %10s %9s %-7s" % ("(not reported)", "-", "-", "")
        print("%-9s %6d %s %18d %10.1f" % ("%dx%d" % (size, size), n, eng, cb, cb / (size * size)))
    print("  engine: the most the session held between batches (per-layer state + up to 3 pending frames);"
          " 'frame 0': the\n  clip ended on the batch after frame 0's, so only the 1-frame state after frame 0"
          " was seen. eager: the\n  official feature cache after the whole clip (2 frames per causal conv, 1 per"
          " temporal downsampling).")
    if not any(r[6] for r in rows):
        print("  (this gst-vae-encode-file predates its \"stream state\" line: rebuild it for the engine's figure)")
    for size, n, _, _, _, _, es, cb in rows:
        if size == 512:
            print("  at 512x512: eager feature cache %.3f GiB measured (note: %.2f GiB)" % (cb / 2 ** 30,
                                                                                       NOTE_GIB_512))
    if steady_px is not None and args.dim == 96:
        print("  at 512x512: engine steady state %.3f GiB (its measured %.1f B/pixel x 512^2; note: %.2f GiB)"
              % (steady_px * 512 * 512 / 2 ** 30, steady_px, NOTE_GIB_512))

    if args.profile:
        size, n = sizes[0]
        frames = pan_frames(n, size)
        from torch.profiler import ProfilerActivity, profile
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            eager_encode(state, frames)
        print()
        print("eager profile, %dx%d x %d frames:" % (size, size, n))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
