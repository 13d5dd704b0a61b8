#!/usr/bin/env python3
"""Float64 reference of the LTX-2 video VAE encoder (Lightricks LTX-2 `VideoEncoder`), whole clip at once, plus
random checkpoints in its key layouts.

Written from the published architecture (../shared/notes/vae-families-2026.md section 2; LTX-2
packages/ltx-core/src/ltx_core/model/video_vae: video_vae.VideoEncoder, sampling.SpaceToDepthDownsample,
convolution.CausalConv3d, resnet.ResnetBlock3D, ops.patchify / PerChannelStatistics), as plain 5-D torch ops in
float64 on the whole clip: the engine's streamed, time-as-batch implementation must agree with it for any batching.

    python3 ltx2_reference.py --self-test      # checks of the reference itself (frame map, prefix stability, ...)
    python3 ltx2_reference.py --write PATH [--layout official|comfy] [--dtype F32|F16|BF16] [--width 8] [--seed 0]
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vae_reference as V  # noqa: E402

# LTX-2.0's encoder block list (DIF get_ltx2_video_vae_config("2.0"), CUI's version-2 guess).
LTX2_BLOCKS = [
    ["res_x", {"num_layers": 4}], ["compress_space_res", {"multiplier": 2}],
    ["res_x", {"num_layers": 6}], ["compress_time_res", {"multiplier": 2}],
    ["res_x", {"num_layers": 6}], ["compress_all_res", {"multiplier": 2}],
    ["res_x", {"num_layers": 2}], ["compress_all_res", {"multiplier": 2}],
    ["res_x", {"num_layers": 2}],
]
# The same kinds at test size: every block kind once or more, fewer layers.
SMALL_BLOCKS = [
    ["res_x", {"num_layers": 1}], ["compress_space_res", {"multiplier": 2}],
    ["res_x", {"num_layers": 2}], ["compress_time_res", {"multiplier": 2}],
    ["res_x", {"num_layers": 1}], ["compress_all_res", {"multiplier": 2}],
    ["res_x", 1], ["compress_all_res", {"multiplier": 2}],
    ["res_x", {"num_layers": 1}],
]
STRIDES = {"compress_space_res": (1, 2, 2), "compress_time_res": (2, 1, 1), "compress_all_res": (2, 2, 2)}


def block_params(b):
    return {"num_layers": b[1]} if isinstance(b[1], int) else b[1]


def make_config(blocks=SMALL_BLOCKS, z=8, patch=4, log_var="uniform", padding="zeros", padding_key="encoder"):
    """The `vae` object of the metadata (flat CausalVideoAutoencoder layout)."""
    cfg = {"_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3,
           "latent_channels": z, "encoder_blocks": blocks, "patch_size": patch, "norm_layer": "pixel_norm",
           "latent_log_var": log_var, "causal_decoder": False, "timestep_conditioning": False,
           "decoder_spatial_padding_mode": "reflect"}
    if padding_key == "encoder":
        cfg["encoder_spatial_padding_mode"] = padding
    elif padding_key == "plain":
        cfg["spatial_padding_mode"] = padding
    return cfg


def scale_factors(cfg):
    t = s = 1
    for b in cfg["encoder_blocks"]:
        if b[0] in STRIDES:
            t *= STRIDES[b[0]][0]
            s *= STRIDES[b[0]][1]
    return t, s * cfg["patch_size"]


def canonical_shapes(cfg):
    """name (without 'vae.') -> shape of the encoder and its statistics."""
    z, p = cfg["latent_channels"], cfg["patch_size"]
    shapes = {}

    def conv(name, o, i):
        shapes[name + ".conv.weight"] = (o, i, 3, 3, 3)
        shapes[name + ".conv.bias"] = (o,)

    conv("encoder.conv_in", z, 3 * p * p)
    c = z
    for i, b in enumerate(cfg["encoder_blocks"]):
        prm = block_params(b)
        if b[0] == "res_x":
            for j in range(prm["num_layers"]):
                conv("encoder.down_blocks.%d.res_blocks.%d.conv1" % (i, j), c, c)
                conv("encoder.down_blocks.%d.res_blocks.%d.conv2" % (i, j), c, c)
        else:
            out = c * prm.get("multiplier", 2)
            conv("encoder.down_blocks.%d.conv" % i, out // int(np.prod(STRIDES[b[0]])), c)
            c = out
    conv("encoder.conv_out", 2 * z if cfg["latent_log_var"] == "per_channel" else z + 1, c)
    for s in ("mean-of-means", "std-of-means", "mean-of-stds", "mean-of-stds_over_std-of-means", "channel"):
        shapes["per_channel_statistics." + s] = (z,)
    return shapes


def make_state(cfg, seed=0):
    """Random weights scaled so that activations stay of order 1 (float64)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(canonical_shapes(cfg).items()):
        if name.endswith("std-of-means"):
            t = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        elif name.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3] * shape[4]
            t = torch.randn(shape, generator=g, dtype=torch.float64) / np.sqrt(fan_in)
        elif name.endswith("channel"):
            t = torch.arange(shape[0], dtype=torch.float64)
        else:
            t = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        state[name] = t
    return state


def write_checkpoint(path, state, cfg, layout="official", dtype="F32", decoder_stub=False, metadata=True):
    """Writes `state` under the layout's names; returns the stored values (rounded to dtype) by canonical name."""
    prefix = "vae." if layout == "official" else ""
    tensors = {prefix + k: v for k, v in state.items()}
    if decoder_stub:  # a decoder and an audio VAE the encoder loader must leave alone
        tensors[prefix + "decoder.conv_in.conv.weight"] = torch.zeros(16, cfg["latent_channels"], 3, 3, 3)
        tensors[prefix + "decoder.conv_in.conv.bias"] = torch.zeros(16)
        if layout == "official":
            tensors["audio_vae.encoder.conv_in.weight"] = torch.zeros(4, 2, 3, 3)
    meta = {"config": json.dumps({"vae": cfg})} if metadata else None
    V.write_safetensors(path, tensors, dtype=dtype, metadata=meta)
    return {k: V.round_to_dtype(v, dtype) for k, v in state.items()}


# ------------------------------------------------------------------------------------------ the network

def causal_conv(state, name, x, padding):
    """CausalConv3d: two copies of the first frame in front, spatial padding 1 per `padding`."""
    x = torch.cat([x[:, :, :1].repeat(1, 1, 2, 1, 1), x], dim=2)
    if padding == "zeros":
        x = F.pad(x, (1, 1, 1, 1, 0, 0))
    else:  # reflect / replicate pad H and W only (F.pad on a 5-D input pads the last 3 dims for these modes)
        n, c, t, h, w = x.shape
        x2 = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
        x2 = F.pad(x2, (1, 1, 1, 1), mode=padding)
        x = x2.reshape(n, t, c, h + 2, w + 2).permute(0, 2, 1, 3, 4)
    return F.conv3d(x, state[name + ".conv.weight"], state[name + ".conv.bias"])


def pixel_norm(x):
    return x / torch.sqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


def space_to_depth(x, st, ss):
    """einops "b c (d p1) (h p2) (w p3) -> b (c p1 p2 p3) d h w"."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // st, st, h // ss, ss, w // ss, ss)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * st * ss * ss, d // st, h // ss, w // ss)


def patchify(x, p):
    """einops "b c f (h q) (w r) -> b (c r q) f h w" (q: row offset, r: column offset)."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // p, p, w // p, p)      # b c f h q w r
    x = x.permute(0, 1, 6, 4, 2, 3, 5)                # b c r q f h w
    return x.reshape(b, c * p * p, f, h // p, w // p)


def encoder_forward(state, cfg, x):
    """x: 1 x 3 x T x H x W float64 in [-1, 1], T = 1 + 8k -> (raw mean, log-variance), each 1 x z x T' x h x w."""
    padding = cfg.get("spatial_padding_mode", cfg.get("encoder_spatial_padding_mode", "zeros"))
    z = cfg["latent_channels"]
    x = patchify(x, cfg["patch_size"])
    x = causal_conv(state, "encoder.conv_in", x, padding)
    for i, b in enumerate(cfg["encoder_blocks"]):
        prm = block_params(b)
        name = "encoder.down_blocks.%d" % i
        if b[0] == "res_x":
            for j in range(prm["num_layers"]):
                layer = name + ".res_blocks.%d" % j
                h = causal_conv(state, layer + ".conv1", F.silu(pixel_norm(x)), padding)
                h = causal_conv(state, layer + ".conv2", F.silu(pixel_norm(h)), padding)
                x = x + h
        else:
            st, ss, _ = STRIDES[b[0]]
            c = x.shape[1]
            out = c * prm.get("multiplier", 2)
            group = c * st * ss * ss // out
            if st == 2:
                x = torch.cat([x[:, :, :1], x], dim=2)
            skip = space_to_depth(x, st, ss)
            skip = skip.reshape(skip.shape[0], out, group, *skip.shape[2:]).mean(dim=2)
            x = space_to_depth(causal_conv(state, name + ".conv", x, padding), st, ss) + skip
    x = causal_conv(state, "encoder.conv_out", F.silu(pixel_norm(x)), padding)
    mean = x[:, :z]
    lv = cfg["latent_log_var"]
    if lv == "per_channel":
        logvar = x[:, z:2 * z]
    elif lv == "uniform":
        logvar = x[:, z:z + 1].expand_as(mean)
    else:
        logvar = torch.full_like(mean, -30.0)
    return mean, logvar


def encode_frames(state, cfg, frames):
    """uint8 N x H x W x 3 -> raw mean latents, float64 numpy T' x z x h x w: the official whole-clip encode
    (centre crop to the spatial factor as ComfyUI's encode does, last (N-1) mod t frames cropped)."""
    t, s = scale_factors(cfg)
    frames = V.crop_frames(frames, s)
    n = frames.shape[0]
    n = n - (n - 1) % t
    x = torch.from_numpy(np.ascontiguousarray(frames[:n])).to(torch.float64) / 255.0 * 2.0 - 1.0
    x = x.permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        mean, _ = encoder_forward(state, cfg, x)
    return mean[0].permute(1, 0, 2, 3).numpy()


def normalise(latents, state):
    """(mean - mean-of-means) / std-of-means per channel (LTX PerChannelStatistics.normalize)."""
    mu = state["per_channel_statistics.mean-of-means"].numpy()[None, :, None, None]
    sd = state["per_channel_statistics.std-of-means"].numpy()[None, :, None, None]
    return (latents - mu) / sd


# ------------------------------------------------------------------------------------------ self-test

def self_test():
    """Checks of the reference itself: shapes, the frame map (latent k depends on frames 8k-7..8k only), prefix
    stability, that the first frame is replicated (not zero) in time, and the patch channel order."""
    cfg = make_config(z=8)
    state = make_state(cfg, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 25, 64, 64, generator=g, dtype=torch.float64) * 2 - 1
    mean, _ = encoder_forward(state, cfg, x)
    ok = True

    def check(cond, msg):
        nonlocal ok
        print(("ok   " if cond else "FAIL ") + msg)
        ok = ok and bool(cond)

    check(tuple(mean.shape) == (1, 8, 4, 2, 2), "25 frames of 64x64 -> 4 latents of 2x2 (%s)" % (tuple(mean.shape),))
    # Frame map: perturbing frame f changes latent k iff f <= 8k (causal), latent 0 only from frame 0.
    for f in (0, 1, 8, 9, 16, 24):
        y = x.clone()
        y[:, :, f] += 0.5
        m2, _ = encoder_forward(state, cfg, y)
        changed = [(m2[:, :, k] - mean[:, :, k]).abs().max().item() > 1e-12 for k in range(4)]
        first = 0 if f == 0 else (f + 7) // 8
        check(changed == [k >= first for k in range(4)], "frame %d first changes latent %d: %s" % (f, first, changed))
    # Prefix stability: 1 + 8k frames give the first latents exactly.
    for n in (1, 9, 17):
        m2, _ = encoder_forward(state, cfg, x[:, :, :n])
        d = (m2 - mean[:, :, :m2.shape[2]]).abs().max().item()
        check(d < 1e-12, "prefix of %d frames: |diff| %.1e" % (n, d))
    # Replicate time padding: a constant clip's latents are all equal (zero padding would make latent 0 differ).
    c = x[:, :, :1].repeat(1, 1, 17, 1, 1)
    mc, _ = encoder_forward(state, cfg, c)
    d = (mc - mc[:, :, :1]).abs().max().item()
    check(d < 1e-12, "a still clip gives equal latents (|diff| %.1e)" % d)
    # Patch order: channel c*16 + column*4 + row.
    img = torch.arange(3 * 4 * 4, dtype=torch.float64).reshape(1, 3, 1, 4, 4)
    pch = patchify(img, 4)[0, :, 0, 0, 0]
    want = [img[0, ci, 0, row, col].item() for ci in range(3) for col in range(4) for row in range(4)]
    check(pch.tolist() == want, "patchify channel order c*16 + column*4 + row")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--write")
    ap.add_argument("--layout", default="official", choices=["official", "comfy"])
    ap.add_argument("--dtype", default="F32")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.self_test:
        return 0 if self_test() else 1
    if a.write:
        cfg = make_config(z=a.width)
        write_checkpoint(a.write, make_state(cfg, a.seed), cfg, a.layout, a.dtype)
        return 0
    ap.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
