#!/usr/bin/env python3
"""Benchmarks for vaeencode, printed as ratios against baselines measured in the
same run (never asserted: speed is not a test).

  scripts/python bench/bench_element.py            # needs a build: bash scripts/build.sh

1. element vs Python: frames/s of `vaeencode` in a pipeline (filesrc ! rawvideoparse
   ! vaeencode ! fakesink, in this process through PyGObject, model load excluded)
   against a PyTorch eager baseline doing what ComfyUI's VAE.encode does per
   sub-batch (pixels/255 -> crop -> NCHW -> 2x-1 -> Encoder + quant_conv -> mean),
   same weights (full SD VAE encoder architecture, random), same frames, sizes,
   batch size and thread count; runs alternated.
2. pipeline overhead: the element against the engine alone (gst-vae-encode-file,
   encode loop only) on the same frames and batches.
3. memory: peak RSS of a gst-launch-1.0 process per size and batch size, and RSS
   sampled over 1,000 frames through a small model.
4. overlap: with upstream work per frame (identity sleep-time, set to the engine's
   time per frame), the element against the sequential sum upstream + engine: the
   encode thread gathers batch k+1 while batch k encodes.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import vae_reference as V  # noqa: E402

BUILD = os.path.join(ROOT, "build")
TOOL = os.path.join(BUILD, "tools", "gst-vae-encode-file")
os.environ["GST_PLUGIN_PATH"] = os.path.join(BUILD, "gst")

import gi  # noqa: E402

gi.require_version("Gst", "1.0")
from gi.repository import Gst  # noqa: E402

Gst.init(None)


def python_baseline(state, frames_u8, per_batch):
    """ComfyUI VAE.encode, per sub-batch, fp32 eager. Returns seconds."""
    start = time.perf_counter()
    with torch.inference_mode():
        pixels = torch.from_numpy(frames_u8).float() / 255.0  # B x H x W x 3, 0..1
        for i in range(0, pixels.shape[0], per_batch):
            chunk = pixels[i:i + per_batch]
            h, w = chunk.shape[1] // 8 * 8, chunk.shape[2] // 8 * 8
            oy, ox = (chunk.shape[1] % 8) // 2, (chunk.shape[2] % 8) // 2
            # movedim leaves channels-last strides, kept by eager through the
            # network, as in ComfyUI (bench_engine.py compares NCHW eager too).
            x = chunk[:, oy:oy + h, ox:ox + w, :].movedim(-1, 1) * 2.0 - 1.0
            V.encoder_forward(state, x)[:, :4]
    return time.perf_counter() - start


def source_desc(raw, width, height, upstream_us=0):
    desc = ("filesrc location=%s blocksize=%d ! rawvideoparse width=%d height=%d format=rgb framerate=25/1"
            % (raw, width * height * 3, width, height))
    if upstream_us:
        desc += " ! identity sleep-time=%d" % upstream_us  # stands for a decoder or a camera
    return desc


def element_run(model, raw, n, width, height, per_batch, threads, upstream_us=0):
    """Seconds from the moment the element has loaded its model to EOS."""
    desc = ("%s ! vaeencode model=%s per-batch=%d threads=%d ! fakesink sync=false"
            % (source_desc(raw, width, height, upstream_us), model, per_batch, threads))
    return run_pipeline(desc)


def upstream_run(raw, width, height, upstream_us):
    return run_pipeline("%s ! fakesink sync=false" % source_desc(raw, width, height, upstream_us))


def run_pipeline(desc):
    pipeline = Gst.parse_launch(desc)
    bus = pipeline.get_bus()
    pipeline.set_state(Gst.State.PAUSED)  # vaeencode loads the model in here
    start = time.perf_counter()
    pipeline.set_state(Gst.State.PLAYING)
    msg = bus.timed_pop_filtered(Gst.CLOCK_TIME_NONE, Gst.MessageType.EOS | Gst.MessageType.ERROR)
    elapsed = time.perf_counter() - start
    pipeline.set_state(Gst.State.NULL)
    if msg.type == Gst.MessageType.ERROR:
        sys.exit("element error: %s" % (msg.parse_error(),))
    return elapsed


def engine_run(model, raw, n, width, height, per_batch, threads):
    out = subprocess.run([TOOL, "--model", model, "--frames", raw, "--n", str(n), "--width", str(width),
                          "--height", str(height), "--format", "RGB", "--per-batch", str(per_batch),
                          "--threads", str(threads), "--out", os.devnull],
                         stderr=subprocess.PIPE, check=True).stderr.decode()
    # "encoded N frames to ... in S s (F frames/s)"
    return float(out.split(" in ")[-1].split(" s ")[0])


def peak_rss_mb(cmd):
    """Peak RSS (VmHWM) of the program itself. wait4's ru_maxrss would count the
    pages the child shared with this (large) process between fork and exec."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    while p.poll() is None:
        try:
            with open("/proc/%d/status" % p.pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024.0)
        except OSError:
            pass
        time.sleep(0.02)
    if p.returncode != 0:
        sys.exit("failed: %s" % " ".join(cmd))
    return peak


def rss_over_time(model, frames, period=0.25):
    cmd = ["gst-launch-1.0", "-q", "videotestsrc", "num-buffers=%d" % frames, "pattern=ball", "!",
           "video/x-raw,format=RGB,width=64,height=64", "!", "vaeencode", "model=" + model, "per-batch=8", "!",
           "fakesink"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []
    while p.poll() is None:
        try:
            with open("/proc/%d/status" % p.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        samples.append(int(line.split()[1]) / 1024.0)
        except OSError:
            break
        time.sleep(period)
    return samples


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,256,512")
    ap.add_argument("--frames", default="8,4,2", help="frames per size")
    ap.add_argument("--per-batch", default="4,4,2", help="batch size per size")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-overlap", action="store_true")
    ap.add_argument("--overlap-size", type=int, default=128)
    ap.add_argument("--overlap-frames", type=int, default=16)
    ap.add_argument("--overlap-per-batch", type=int, default=4)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(s) for s in args.frames.split(",")]
    batches = [int(s) for s in args.per_batch.split(",")]
    torch.set_num_threads(args.threads)

    tmp = tempfile.mkdtemp(prefix="gstvae-bench-")
    model = os.path.join(tmp, "sd-vae-untrained.safetensors")
    V.make_checkpoint(model, layout="ldm", ch=128, mult=(1, 2, 4, 4), blocks=2, z=4, seed=0, include_decoder=False)
    state = {k: v.float() for k, v in V.load_ldm_state(model).items()}
    print("machine: %s, %d threads, torch %s; model: full SD VAE encoder (34.2 M parameters, random weights)"
          % (os.uname().machine, args.threads, torch.__version__))

    print("\n%-6s %6s %5s | %12s %12s %12s | %8s %9s" % ("size", "frames", "batch", "python f/s", "element f/s",
                                                        "engine f/s", "el/py", "overhead"))
    for size, n, per_batch in zip(sizes, counts, batches):
        if args.skip_speed:
            break
        raw = os.path.join(tmp, "frames_%d.raw" % size)
        data = V.make_frames(n, size, size, "RGB", seed=size)
        with open(raw, "wb") as f:
            f.write(data)
        frames_u8 = V.unpack_frames(data, n, size, size, size * 3, "RGB")
        t_py, t_el, t_en = [], [], []
        for _ in range(args.reps):  # alternated, best of reps
            t_py.append(python_baseline(state, frames_u8, per_batch))
            t_el.append(element_run(model, raw, n, size, size, per_batch, args.threads))
            t_en.append(engine_run(model, raw, n, size, size, per_batch, args.threads))
        py, el, en = n / min(t_py), n / min(t_el), n / min(t_en)
        print("%-6s %6d %5d | %12.3f %12.3f %12.3f | %7.2fx %8.1f%%" % ("%d²" % size, n, per_batch, py, el, en,
                                                                       el / py, (en / el - 1) * 100), flush=True)

    if not args.skip_overlap:
        size, n, per_batch = args.overlap_size, args.overlap_frames, args.overlap_per_batch
        raw = os.path.join(tmp, "overlap_%d.raw" % size)
        with open(raw, "wb") as f:
            f.write(V.make_frames(n, size, size, "RGB", seed=size + 1))
        t_en = engine_run(model, raw, n, size, size, per_batch, args.threads)
        upstream_us = int(t_en / n * 1e6)  # upstream as slow as the encoder, per frame
        t_up, t_el = [], []
        for _ in range(args.reps):
            t_up.append(upstream_run(raw, size, size, upstream_us))
            t_el.append(element_run(model, raw, n, size, size, per_batch, args.threads, upstream_us))
        up, el = min(t_up), min(t_el)
        batches = -(-n // per_batch)
        ideal = up + t_en / batches  # gathering hidden behind encoding, but the last batch's encode
        print("\noverlap (%d², %d frames, per-batch %d, upstream %.0f ms/frame): upstream alone %.2f s, engine alone "
              "%.2f s, sequential sum %.2f s; element %.2f s = %.2fx the sequential sum (ideal %.2f s = %.2fx)"
              % (size, n, per_batch, upstream_us / 1000, up, t_en, up + t_en, el, el / (up + t_en), ideal,
                 ideal / (up + t_en)), flush=True)

    if args.skip_memory:
        return
    weights_mb = os.path.getsize(model) / 2**20
    print("\npeak RSS of gst-launch-1.0 (videotestsrc ! vaeencode ! fakesink), weights %.0f MB:" % weights_mb)
    small = os.path.join(tmp, "small.safetensors")
    V.make_checkpoint(small, layout="ldm", ch=32, mult=(1, 2, 2, 2), blocks=1, z=4, seed=1)
    # The runtime without the big model: GStreamer, LibTorch, oneDNN, a tiny model and frame.
    base = peak_rss_mb(["gst-launch-1.0", "-q", "videotestsrc", "num-buffers=1", "!",
                        "video/x-raw,format=RGB,width=8,height=8", "!", "vaeencode", "model=" + small, "!",
                        "fakesink"])
    print("  runtime (gst-launch-1.0, LibTorch, a tiny model): %.0f MB" % base)
    for size in sizes:
        for per_batch in (1, 4) if size < 512 else (1, 2):
            rss = peak_rss_mb(["gst-launch-1.0", "-q", "videotestsrc", "num-buffers=%d" % per_batch, "!",
                               "video/x-raw,format=RGB,width=%d,height=%d" % (size, size), "!", "vaeencode",
                               "model=" + model, "per-batch=%d" % per_batch, "!", "fakesink"])
            # Activations of one batch, largest live set: a level-0 ResnetBlock
            # holds its input, norm/SiLU output and conv output (3 x 128 x H x W
            # floats per frame) plus oneDNN's reordered copies of two of them.
            act_mb = per_batch * 5 * 128 * size * size * 4 / 2**20
            print("  %4d² batch %d: peak %5.0f MB; above the runtime %5.0f MB = weights %.0f + %.2f x "
                  "estimated batch activations (%.0f MB)" % (size, per_batch, rss, rss - base, weights_mb,
                                                            (rss - base - weights_mb) / act_mb, act_mb), flush=True)

    # RSS rises and falls within each batch (activations), so a flat stream is
    # one whose band does not move: compare the two halves after warm-up.
    for frames in (1000, 5000):
        s = rss_over_time(small, frames)
        if len(s) < 10:
            continue
        steady = s[len(s) // 5:]
        first, second = steady[:len(steady) // 2], steady[len(steady) // 2:]
        print("RSS over %d frames (64², small model, per-batch 8): %d samples after 20%%: band %.1f..%.1f MB "
              "(%.1f%% wide); first half max %.1f MB, second half max %.1f MB (%+.1f%%)"
              % (frames, len(steady), min(steady), max(steady), (max(steady) / min(steady) - 1) * 100,
                 max(first), max(second), (max(second) / max(first) - 1) * 100), flush=True)


if __name__ == "__main__":
    main()
