#!/usr/bin/env python3
"""Engine alone against PyTorch eager, on one device, printed as ratios measured
in the same run (never asserted: speed is not a test).

  scripts/python bench/bench_engine.py                       # CPU, 256², batches 1,4
  python3 bench/bench_engine.py --device cuda --size 512 --batches 1,4,16 --precisions fp32,bf16

Needs gst-vae-engine-bench (bash scripts/build.sh; on a GPU machine without
GStreamer see docs/performance.md) and PyTorch in this Python. Both sides encode
the same frames with the same weights (the full SD VAE encoder architecture,
random) in the same precision: the engine through gst-vae-engine-bench, the
baseline doing what ComfyUI's VAE.encode does per sub-batch (uint8 -> /255 ->
crop -> NCHW -> 2x-1 -> Encoder + quant_conv in the VAE dtype, eager, under
inference_mode, attention through scaled_dot_product_attention where PyTorch has
it, as ComfyUI's pytorch attention does; input made NCHW-contiguous unless
--comfyui-layout keeps the channels-last strides of ComfyUI's movedim). Frames/s count the upload of the 8-bit
frames and the latents' way back to the host on both sides. One warm-up batch,
then --iters timed batches per configuration. The engine is timed twice: serial
(prepare, encode, batch after batch) and overlapped as in the element (the next
batch prepared, on GPUs uploaded, by another thread while one encodes).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import vae_reference as V  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attn_block_sdpa(state, name, x):
    """The VAE's single-head attention as ComfyUI's pytorch_attention computes it."""
    h = V._norm(state, name + ".norm", x)
    q, k, v = (V._conv(state, name + "." + p, h) for p in "qkv")
    b, c, hh, ww = q.shape
    q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(2, 3).contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(2, 3).reshape(b, c, hh, ww)
    return x + V._conv(state, name + ".proj_out", out)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def python_batch(state, frames_u8, device, dtype, comfyui_layout, forward=None):
    """ComfyUI VAE.encode for one sub-batch; returns the mean on the host.

    ComfyUI's movedim leaves channels-last strides, which eager keeps through
    the network. By default the input is made NCHW-contiguous instead: faster in
    fp32 on the CPU, and correct in bf16, where the CPU GroupNorm of Debian's
    torch 1.13 was wrong on channels-last input (see docs/performance.md).
    `forward`: another forward pass of the same state (torch.compile's)."""
    pixels = frames_u8.to(device).float() / 255.0  # N x H x W x 3
    h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
    oy, ox = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
    x = (pixels[:, oy:oy + h, ox:ox + w, :].movedim(-1, 1) * 2.0 - 1.0).to(dtype)
    if not comfyui_layout:
        x = x.contiguous()
    return (forward or (lambda t: V.encoder_forward(state, t)))(x)[:, :4].float().cpu()


def python_fps(state, size, batch, device, dtype, iters, comfyui_layout, forward=None):
    gen = torch.Generator().manual_seed(batch)
    frames = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)
    with torch.inference_mode():
        # warm-up (cuDNN autotuning, allocator; torch.compile compiles here)
        python_batch(state, frames, device, dtype, comfyui_layout, forward)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            python_batch(state, frames, device, dtype, comfyui_layout, forward)
        synchronize(device)
    return batch * iters / (time.perf_counter() - start)


def engine_fps(tool, model, size, batches, precisions, device, iters, threads):
    """{(precision, batch): (serial frames/s, overlapped frames/s)} from gst-vae-engine-bench's table."""
    out = subprocess.run([tool, model, "--size", str(size), "--batches", ",".join(map(str, batches)),
                          "--precisions", ",".join(precisions), "--device", device, "--iters", str(iters),
                          "--threads", str(threads)], stdout=subprocess.PIPE, check=True).stdout.decode()
    result = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+(\w+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            result[(m.group(2), int(m.group(3)))] = (float(m.group(5)), float(m.group(6)))
        elif "skipped" in line or "failed" in line or line.startswith("levers:"):
            print("engine: " + line.strip())
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N], the same for both sides")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tool", default=os.path.join(ROOT, "build", "bench", "gst-vae-engine-bench"))
    ap.add_argument("--model", help="a checkpoint to use instead of a random full SD VAE")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile (inductor, static shapes) of the same forward pass; "
                         "compiling is not timed (the warm-up batch)")
    ap.add_argument("--comfyui-layout", action="store_true",
                    help="keep the channels-last strides ComfyUI's movedim gives (default: NCHW-contiguous input)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    precisions = args.precisions.split(",")
    for p in precisions:
        if p not in DTYPES:
            sys.exit("unknown precision %r (%s)" % (p, ", ".join(DTYPES)))
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the engine does on CUDA
        torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 on both sides
        torch.backends.cuda.matmul.allow_tf32 = False
    if hasattr(F, "scaled_dot_product_attention"):
        V.attn_block = attn_block_sdpa

    model = args.model
    if not model:
        model = os.path.join(tempfile.mkdtemp(prefix="gstvae-bench-"), "sd-vae-untrained.safetensors")
        V.make_checkpoint(model, layout="ldm", ch=128, mult=(1, 2, 4, 4), blocks=2, z=4, seed=0,
                          include_decoder=False)
    state32 = {k: v.float() for k, v in V.load_ldm_state(model).items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "%s CPU, %d threads" % (
        os.uname().machine, args.threads)
    print("device: %s; torch %s; model: %s; %d²" % (name, torch.__version__, args.model or
                                                      "full SD VAE encoder, random weights", args.size))

    engine = engine_fps(args.tool, model, args.size, batches, precisions, args.device, args.iters, args.threads)
    print("%-5s %6s | %12s %12s %12s | %7s %7s" % ("prec", "batch", "python f/s", "engine f/s", "overlapped",
                                                  "ratio", "ovl.") +
          (" | %12s %7s" % ("compiled f/s", "vs cmp") if args.compile else ""))
    for p in precisions:
        state = {k: v.to(device, DTYPES[p]) for k, v in state32.items()}
        compiled = torch.compile(lambda t, state=state: V.encoder_forward(state, t), dynamic=False) \
            if args.compile else None
        for b in batches:
            try:
                py = python_fps(state, args.size, b, device, DTYPES[p], args.iters, args.comfyui_layout)
            except RuntimeError as e:
                print("%-5s %6d | python failed: %s" % (p, b, str(e).splitlines()[0]))
                continue
            cmp_text = ""
            if compiled is not None:
                try:
                    cmp = python_fps(state, args.size, b, device, DTYPES[p], args.iters, args.comfyui_layout,
                                     compiled)
                    cmp_text = " | %12.3f %s" % (cmp, "%6.2fx" % (engine[(p, b)][1] / cmp) if (p, b) in engine
                                                 else "-")
                except Exception as e:  # noqa: BLE001 - inductor's failures are many; the row says which
                    cmp_text = " | compile failed: %s" % str(e).splitlines()[0][:80]
            if (p, b) not in engine:
                print("%-5s %6d | %12.3f %12s" % (p, b, py, "engine: -") + cmp_text, flush=True)
                continue
            serial, overlapped = engine[(p, b)]
            print("%-5s %6d | %12.3f %12.3f %12.3f | %6.2fx %6.2fx" % (p, b, py, serial, overlapped, serial / py,
                                                                      overlapped / py) + cmp_text, flush=True)


if __name__ == "__main__":
    main()
