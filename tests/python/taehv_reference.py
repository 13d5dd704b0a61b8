#!/usr/bin/env python3
"""Float64 reference of the TAEHV video encoders and decoders and a test-weight generator.

Variants (SPECS): taew2_1, taew2_2 (Wan), taehv1_5 (HunyuanVideo 1.5, TAE: ReLU, RGB [0, 1], the model's space =
raw x 1.03682), lighttaehy1_5 (lightx2v: LeakyReLU(0.2) everywhere, RGB [-1, 1] in and out, raw HunyuanVideo 1.5
latents), taeltx_2 / taeltx2_3 (LTX-2 / 2.3: 128 channels, 4x4 patches, TPools 2,2,2 and TGrows 2,2,2, 8 frames
per latent, 7 trimmed at decode; LTX's normalised latents as they are).  The "super" decoder (taew2_2_super,
taehv1_5_super; from a description of madebyollin/taehv's SuperMemBlock): 0 conv1x1 z -> n0 (no bias, no Clamp);
per stage three SuperMemBlocks x + conv1x1(4n -> n, no bias)(ReLU(conv1x1(2n -> 4n)(depthwise7x7([x, past])))),
then conv3x3 n -> 4 n' (bias), ReLU, PixelShuffle(2), TGrow (first index 1, 8, 15); 22 conv3x3 n3 -> 3 p p.

Encoder: written from the architecture description in docs/video-vaes-taehv.md.  Decoder: written from a
description of madebyollin/taehv taehv.py (the ``decoder`` nn.Sequential: Clamp = tanh(x/3)*3, conv 3x3,
MemBlock, nn.Upsample(2) nearest, TGrow; ``decode_video``: clamp(0, 1), pixel_shuffle, drop the first 3
frames).  Not from the C++ engine: torch.nn.functional in float64.  Tensor names are the indices of
upstream's ``encoder`` / ``decoder`` nn.Sequential (``encoder.0.weight``, ``encoder.2.conv.weight``,
``encoder.4.conv.0.weight``, ``decoder.1.weight``, ``decoder.7.conv.weight``, ``decoder.22.bias``, ...).

  encode_clip(state, frames, end="drop"|"pad")   one clip, T x 3 x H x W in [0, 1] -> the model's
                                                  normalised latents, T_lat x z x H/d x W/d
  encode_stream(state, frames, ...)               the same frame by frame (MemBlock state, pool buffers)
  to_raw(latents, variant)                        raw = x * std + mean (the Wan VAE's raw mean)
  make_state(variant, width, seed)                random weights in the real layout, activations O(1)
  write_state(path, state, dtype)                 .safetensors in F32 / F16 / BF16

  decode_video(dec, latents, plan=None)           normalised latents T x z x h x w -> (4T - 3) x 3 x H x W in
                                                  [0, 1]; plan = sizes of consecutive calls sharing the
                                                  MemBlock memory (the self-test shows any plan is exact)
  from_raw(latents, variant)                      (raw - mean) / std, the decoder's input space
  make_decoder_state(variant, widths, seed)       random decoder weights (widths real: 256, 128, 64, 64), the
                                                  last conv calibrated to outputs mostly inside (0, 1)
  write_model(path, state, decoder, dtype)        a whole file (encoder. + decoder.); load_decoder(path)

Decoder rules: Sequential 0 Clamp, 1 conv(z, w0) + ReLU, 3-5 MemBlock(w0), 6 Upsample, 7 TGrow(w0, 1),
8 conv(w0, w1, no bias), 9-11 MemBlock(w1), 12 Upsample, 13 TGrow(w1, 2), 14 conv(w1, w2, no bias), 15-17
MemBlock(w2), 18 Upsample, 19 TGrow(w2, 2), 20 conv(w2, w3, no bias), 21 ReLU, 22 conv(w3, 3 p p).
MemBlock(x, past) = ReLU(conv4(ReLU(conv2(ReLU(conv0([x, past]))))) + x), past = the block's input one
frame earlier at its own rate (zeros first); TGrow: output frame t*s + j = channels [j C, (j+1) C) of a 1x1
conv C -> C s.

CLI:
  python3 tests/python/taehv_reference.py make-weights --variant taew2_1 --out X.safetensors --seed 1
          [--width 16] [--dtype F32|F16|BF16] [--decoder-widths 32,16,8,8 (a whole file with a decoder)]
  python3 tests/python/taehv_reference.py selftest

No real TAEHV weights are used anywhere: every test runs on generated ones.  Run with scripts/python.
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vae_reference as V  # noqa: E402  (safetensors I/O only)

# The Wan VAEs' per-channel latent statistics, from the Wan reference (one table for the project's Python).
from wan_reference import WAN21_MEAN, WAN21_STD, WAN22_MEAN, WAN22_STD  # noqa: E402

HV15_SCALE = 1.03682   # HunyuanVideo 1.5's scaling_factor: its model takes raw x 1.03682

# variant -> everything the reference needs: patch, latent channels, encoder TPool strides, decoder TGrow
# strides, activation slope (0: ReLU), signed RGB ([-1, 1] in and out), the network's space as a map to the
# big VAE family's latents ("wan": x * std + mean; "scale": x / scale; "raw": as is).
SPECS = {
    "taew2_1": dict(patch=1, z=16, pools=(2, 2, 1), grows=(1, 2, 2), slope=0.0, signed=False, space="wan",
                    mean=WAN21_MEAN, std=WAN21_STD),
    "taew2_2": dict(patch=2, z=48, pools=(2, 2, 1), grows=(1, 2, 2), slope=0.0, signed=False, space="wan",
                    mean=WAN22_MEAN, std=WAN22_STD),
    "taehv1_5": dict(patch=2, z=32, pools=(2, 2, 1), grows=(1, 2, 2), slope=0.0, signed=False, space="scale",
                     scale=HV15_SCALE),
    "lighttaehy1_5": dict(patch=2, z=32, pools=(2, 2, 1), grows=(1, 2, 2), slope=0.2, signed=True, space="raw"),
    "taeltx_2": dict(patch=4, z=128, pools=(2, 2, 2), grows=(2, 2, 2), slope=0.0, signed=False, space="raw"),
    "taeltx2_3": dict(patch=4, z=128, pools=(2, 2, 2), grows=(2, 2, 2), slope=0.0, signed=False, space="raw"),
}

# variant -> (input patch size, latent channels, mean, std): the older interface (mean, std None off Wan)
VARIANTS = {name: (sp["patch"], sp["z"], sp.get("mean"), sp.get("std")) for name, sp in SPECS.items()}

# The encoder Sequential: (index, kind, argument).  conv: 3x3 (argument = stride); pool: TPool
# (argument = frames merged); mem: MemBlock; relu.  The last TPool merges 1 frame (a plain 1x1 conv).
def encoder_plan(pools=(2, 2, 1)):
    return ([(0, "conv", 1), (1, "relu", None)]
            + [step for first, pool in zip((2, 7, 12), pools)
               for step in [(first, "pool", pool), (first + 1, "conv", 2),
                            (first + 2, "mem", None), (first + 3, "mem", None), (first + 4, "mem", None)]]
            + [(17, "conv", 1)])


PLAN = encoder_plan()
FRAMES_PER_LATENT = 4   # the product of the pool arguments (Wan, HunyuanVideo 1.5; 8 for taeltx)


def frames_per_latent(variant):
    return math.prod(SPECS[variant]["pools"])
SPATIAL_DOWNSCALE = 8   # three stride-2 convs (times the patch size)


def variant_of(state):
    """The first variant whose shapes `state` (keys without 'encoder.') has (taew2_1 and taew2_2 are alone with
    theirs; pass the variant explicitly for the others)."""
    cin = state["0.weight"].shape[1]
    cout = state["17.weight"].shape[0]
    for name, (patch, z, _, _) in VARIANTS.items():
        if cin == 3 * patch * patch and cout == z:
            return name
    raise ValueError("no known TAEHV variant has %d input and %d latent channels" % (cin, cout))


def patch_of(state):
    """The input patch size: encoder.0 takes 3 * p * p channels."""
    return int(round(math.sqrt(state["0.weight"].shape[1] / 3)))


def to_raw(latents, variant):
    """The network's latents -> the big VAE family's (Wan: x * std + mean; taehv1_5: x / 1.03682; else as is)."""
    sp = SPECS[variant]
    if sp["space"] == "scale":
        return latents / sp["scale"]
    if sp["space"] == "raw":
        return latents.clone()
    shape = (1, sp["z"]) + (1,) * (latents.dim() - 2)
    return (latents * torch.tensor(sp["std"], dtype=latents.dtype).view(shape)
            + torch.tensor(sp["mean"], dtype=latents.dtype).view(shape))


def space_to_depth(x, p):
    """N x C x H x W -> N x C*p*p x H/p x W/p; channel c*p*p + row_offset*p + column_offset."""
    if p == 1:
        return x
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * p * p, h // p, w // p)


# ------------------------------------------------------------------------------- layers (float64)

def _conv(state, n, x, stride=1):
    w = state["%d.weight" % n]
    return F.conv2d(x, w, state.get("%d.bias" % n), stride=stride, padding=w.shape[-1] // 2)


def _pool(state, n, x, frames):
    """x: T x C x h x w with T a multiple of `frames`; frames t..t+frames-1 side by side in channels."""
    t, c, h, w = x.shape
    merged = torch.cat([x[j::frames] for j in range(frames)], dim=1)   # channel j*C + c
    return F.conv2d(merged, state["%d.conv.weight" % n])


def _grow(state, n, x, stride):
    """TGrow: 1x1 conv (no bias) C -> C*stride; output frame t*stride + s takes channels [s*C, (s+1)*C)."""
    t, c, h, w = x.shape
    y = F.conv2d(x, state["%d.conv.weight" % n])
    return y.reshape(t * stride, c, h, w)


def _act(x, slope):
    return F.relu(x) if slope == 0.0 else F.leaky_relu(x, slope)


def _mem(state, n, x, past, slope=0.0):
    """MemBlock: act(conv4(act(conv2(act(conv0([x, past]))))) + x); past = the previous frame's input."""
    p = "%d.conv." % n
    h = _act(F.conv2d(torch.cat([x, past], 1), state[p + "0.weight"], state[p + "0.bias"], padding=1), slope)
    h = _act(F.conv2d(h, state[p + "2.weight"], state[p + "2.bias"], padding=1), slope)
    h = F.conv2d(h, state[p + "4.weight"], state[p + "4.bias"], padding=1)
    skip = F.conv2d(x, state["%d.skip.weight" % n]) if "%d.skip.weight" % n in state else x
    return _act(h + skip, slope)


def _super_mem(state, n, x, past):
    """SuperMemBlock: x + conv3(relu(conv1(depthwise7x7(conv0)([x, past])))), no outer activation."""
    p = "%d.conv." % n
    y = torch.cat([x, past], 1)
    h = F.conv2d(y, state[p + "0.weight"], None, padding=3, groups=y.shape[1])
    h = F.relu(F.conv2d(h, state[p + "1.weight"], state[p + "1.bias"]))
    return x + F.conv2d(h, state[p + "3.weight"])


def _run(state, x, memory, plan=PLAN, slope=0.0):
    """All layers of `plan` over T frames at once (encoder: T a multiple of the frames per latent). memory:
    MemBlock index -> last input (or absent); a MemBlock sees the previous frame AT ITS OWN RATE."""
    for n, kind, arg in plan:
        if kind == "conv":
            x = _conv(state, n, x, arg)
        elif kind == "relu":
            x = _act(x, slope)
        elif kind == "shuffle":
            x = F.pixel_shuffle(x, 2)
        elif kind == "pool":
            x = _pool(state, n, x, arg)
        elif kind == "clamp":
            x = torch.tanh(x / 3.0) * 3.0
        elif kind == "up":
            x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        elif kind == "grow":
            x = _grow(state, n, x, arg)
        else:
            prev = memory.get(n)
            if prev is None:
                prev = torch.zeros_like(x[:1])
            past = torch.cat([prev, x[:-1]], 0)   # frame t sees frame t-1's input at this block
            memory[n] = x[-1:].clone()
            x = _super_mem(state, n, x, past) if kind == "smem" else _mem(state, n, x, past, slope)
    return x


def _input(frames, variant):
    """[0, 1] frames -> the variant's input range (lightx2v's file takes 2p - 1)."""
    return frames * 2.0 - 1.0 if SPECS[variant]["signed"] else frames


def encode_clip(state, frames, end="drop", variant=None):
    """One whole clip, frames T x 3 x H x W float64 in [0, 1] -> the network's latents T_lat x z x h x w.

    end="drop": frames after the last complete group of g (4, or 8 for taeltx) are dropped; end="pad": the
    last group is completed by repeating the clip's last frame (upstream's encode_video).  T_lat may be 0.
    variant: from the shapes when None (taew2_1, taew2_2 only)."""
    variant = variant or variant_of(state)
    sp = SPECS[variant]
    patch = sp["patch"]
    g = frames_per_latent(variant)
    t = frames.shape[0]
    if end == "pad" and t % g:
        frames = torch.cat([frames, frames[-1:].expand(g - t % g, -1, -1, -1)], 0)
    else:
        frames = frames[: t // g * g]
    if frames.shape[0] == 0:
        h, w = frames.shape[2] // (SPATIAL_DOWNSCALE * patch), frames.shape[3] // (SPATIAL_DOWNSCALE * patch)
        return torch.zeros(0, sp["z"], h, w, dtype=torch.float64)
    return _run(state, space_to_depth(_input(frames, variant), patch), {}, encoder_plan(sp["pools"]), sp["slope"])


def encode_stream(state, frames, end="drop", variant=None):
    """The same clip fed one frame at a time through a stateful loop (MemBlock inputs kept per block,
    frames waiting in each TPool until it has enough).  Returns the same latents as encode_clip."""
    variant = variant or variant_of(state)
    sp = SPECS[variant]
    patch, g, plan, slope = sp["patch"], frames_per_latent(variant), encoder_plan(sp["pools"]), sp["slope"]
    memory, waiting, out = {}, {}, []
    t = frames.shape[0]
    if end == "pad" and t % g:
        frames = torch.cat([frames, frames[-1:].expand(g - t % g, -1, -1, -1)])
    frames = _input(frames, variant)

    def push(x, start):
        for pos in range(start, len(plan)):
            n, kind, arg = plan[pos]
            if kind == "conv":
                x = _conv(state, n, x, arg)
            elif kind == "relu":
                x = _act(x, slope)
            elif kind == "pool":
                waiting.setdefault(n, []).append(x)
                if len(waiting[n]) < arg:
                    return None
                x = _pool(state, n, torch.cat(waiting.pop(n), 0), arg)
            else:
                prev = memory.get(n)
                memory[n] = x
                x = _mem(state, n, x, torch.zeros_like(x) if prev is None else prev, slope)
        return x

    for i in range(frames.shape[0]):
        y = push(space_to_depth(frames[i:i + 1], patch), 0)
        if y is not None:
            out.append(y)
    if not out:
        return torch.zeros(0, sp["z"], frames.shape[2] // (SPATIAL_DOWNSCALE * patch),
                           frames.shape[3] // (SPATIAL_DOWNSCALE * patch),
                           dtype=torch.float64)
    return torch.cat(out, 0)


# ------------------------------------------------------------------------------- decoder (float64)
# From a description of madebyollin/taehv taehv.py: the ``decoder`` Sequential and ``decode_video``.

def decoder_plan(grows=(1, 2, 2)):
    return ([(0, "clamp", None), (1, "conv", 1), (2, "relu", None)]
            + [step for first, grow in zip((3, 9, 15), grows)
               for step in [(first, "mem", None), (first + 1, "mem", None), (first + 2, "mem", None),
                            (first + 3, "up", None), (first + 4, "grow", grow), (first + 5, "conv", 1)]]
            + [(21, "relu", None), (22, "conv", 1)])


def super_decoder_plan(grows=(1, 2, 2)):
    """The super decoder: no Clamp, a 1x1 conv, and per stage SuperMemBlocks, conv, ReLU, PixelShuffle, TGrow."""
    return ([(0, "conv", 1)]
            + [step for first, grow in zip((1, 8, 15), grows)
               for step in [(first, "smem", None), (first + 1, "smem", None), (first + 2, "smem", None),
                            (first + 3, "conv", 1), (first + 4, "relu", None), (first + 5, "shuffle", None),
                            (first + 6, "grow", grow)]]
            + [(22, "conv", 1)])


DECODER_PLAN = decoder_plan()
FRAMES_TO_TRIM = 3   # 2 ** (number of TGrow(.., 2)) - 1: the first frames decode_video drops (7 for taeltx)


def is_super(dec):
    return "0.weight" in dec and "1.weight" not in dec


def decoder_patch(dec):
    """The output patch size: decoder.22 gives 3 * p * p channels."""
    return int(round(math.sqrt(dec["22.weight"].shape[0] / 3)))


def decoder_variant(dec):
    """The first variant with these shapes (pass the variant explicitly where two share them)."""
    z, p = dec["0.weight" if is_super(dec) else "1.weight"].shape[1], decoder_patch(dec)
    for name, (patch, zz, _, _) in VARIANTS.items():
        if patch == p and zz == z:
            return name
    raise ValueError("no known TAEHV variant has %d latent channels and %dx%d output patches" % (z, p, p))


def decode_video(dec, latents, plan=None, variant=None):
    """The network's latents T x z x h x w (float64) -> frames (gT - (g-1)) x 3 x H x W in [0, 1] (g = 4, or 8
    for taeltx).

    The decoder runs over the latents in time order (plan: sizes of the consecutive calls sharing the MemBlock
    memory; default all at once), clamp(0, 1) (lightx2v's signed output: clamp(-1, 1), then (x + 1) / 2),
    pixel_shuffle(p) (channel c*p*p + row*p + col), then the first g - 1 frames are dropped."""
    variant = variant or decoder_variant(dec)
    sp = SPECS[variant]
    layers = super_decoder_plan(sp["grows"]) if is_super(dec) else decoder_plan(sp["grows"])
    t = latents.shape[0]
    plan = [t] if plan is None else list(plan)
    if sum(plan) != t:
        raise ValueError("plan %s covers %d latents, not %d" % (plan, sum(plan), t))
    memory, outs, pos = {}, [], 0
    for size in plan:
        if size:
            outs.append(_run(dec, latents[pos:pos + size].to(torch.float64), memory, layers, sp["slope"]))
        pos += size
    x = torch.cat(outs, 0)
    x = (x.clamp(-1.0, 1.0) + 1.0) / 2.0 if sp["signed"] else x.clamp(0.0, 1.0)
    p = decoder_patch(dec)
    if p > 1:
        x = F.pixel_shuffle(x, p)
    return x[math.prod(sp["grows"]) - 1:]


def decoded_frames(t, variant="taew2_1"):
    """Frames T latents decode to: gT - (g - 1)."""
    g = math.prod(SPECS[variant]["grows"])
    return max(g * t - (g - 1), 0)


def from_raw(latents, variant):
    """The big VAE family's latents -> the network's space (inverse of to_raw)."""
    sp = SPECS[variant]
    if sp["space"] == "scale":
        return latents * sp["scale"]
    if sp["space"] == "raw":
        return latents.clone()
    shape = (1, sp["z"]) + (1,) * (latents.dim() - 2)
    return ((latents - torch.tensor(sp["mean"], dtype=latents.dtype).view(shape))
            / torch.tensor(sp["std"], dtype=latents.dtype).view(shape))


# ------------------------------------------------------------------------------- random weights

def _he(gen, shape, gain):
    fan_in = shape[1] * shape[2] * shape[3]
    return torch.randn(shape, generator=gen, dtype=torch.float64) * math.sqrt(gain / fan_in)


def _bias(gen, n, scale=0.05):
    return torch.randn(n, generator=gen, dtype=torch.float64) * scale


def make_state(variant="taew2_1", width=64, seed=0):
    """Random encoder weights in TAEHV's layout (keys without the 'encoder.' prefix), float64.

    Scales keep every activation O(1) on [0, 1] input: He-style gains, the last conv of each MemBlock
    small so that nine residual sums stay bounded, the final conv normalised to unit output."""
    patch, z, _, _ = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    s = {"0.weight": _he(gen, (width, 3 * patch * patch, 3, 3), 2.0), "0.bias": _bias(gen, width)}
    for first, pool in zip((2, 7, 12), SPECS[variant]["pools"]):
        s["%d.conv.weight" % first] = _he(gen, (width, width * pool, 1, 1), 1.0)
        s["%d.weight" % (first + 1)] = _he(gen, (width, width, 3, 3), 1.0)
        for m in range(first + 2, first + 5):
            p = "%d.conv." % m
            s[p + "0.weight"] = _he(gen, (width, 2 * width, 3, 3), 2.0)
            s[p + "0.bias"] = _bias(gen, width)
            s[p + "2.weight"] = _he(gen, (width, width, 3, 3), 2.0)
            s[p + "2.bias"] = _bias(gen, width)
            s[p + "4.weight"] = _he(gen, (width, width, 3, 3), 0.3)
            s[p + "4.bias"] = _bias(gen, width)
    s["17.weight"] = _he(gen, (z, width, 3, 3), 2.0)
    s["17.bias"] = _bias(gen, z)
    return s


def make_decoder_state(variant="taew2_1", widths=(256, 128, 64, 64), seed=0, out_std=0.25, super_=False):
    """Random decoder weights in TAEHV's layout (keys without the 'decoder.' prefix), float64.

    Scales as the encoder's (He gains; each MemBlock's last conv small); the final conv is calibrated on
    random N(0, 1) latents so that the output has mean 0.5 and std `out_std`: mostly inside (0, 1), so that
    the clamp hides little (signed output: mean 0, std 2 out_std).  super_: the super decoder's layout
    (real widths 512, 256, 128, 64)."""
    sp = SPECS[variant]
    patch, z = sp["patch"], sp["z"]
    gen = torch.Generator().manual_seed(seed)
    w0, w1, w2, w3 = widths
    if super_:
        s = {"0.weight": _he(gen, (w0, z, 1, 1), 1.0)}
        for first, grow, cin, cout in zip((1, 8, 15), sp["grows"], (w0, w1, w2), (w1, w2, w3)):
            for m in range(first, first + 3):
                p = "%d.conv." % m
                s[p + "0.weight"] = _he(gen, (2 * cin, 1, 7, 7), 1.0)
                s[p + "1.weight"] = _he(gen, (4 * cin, 2 * cin, 1, 1), 2.0)
                s[p + "1.bias"] = _bias(gen, 4 * cin)
                s[p + "3.weight"] = _he(gen, (cin, 4 * cin, 1, 1), 0.3)
            s["%d.weight" % (first + 3)] = _he(gen, (4 * cout, cin, 3, 3), 2.0)
            s["%d.bias" % (first + 3)] = _bias(gen, 4 * cout)
            s["%d.conv.weight" % (first + 6)] = _he(gen, (cout * grow, cout, 1, 1), 1.0)
        plan = super_decoder_plan(sp["grows"])
        return _calibrate(s, gen, patch, z, w3, plan, sp, out_std)
    s = {"1.weight": _he(gen, (w0, z, 3, 3), 2.0), "1.bias": _bias(gen, w0)}
    for first, grow, cin, cout in zip((3, 9, 15), sp["grows"], (w0, w1, w2), (w1, w2, w3)):
        for m in range(first, first + 3):
            p = "%d.conv." % m
            s[p + "0.weight"] = _he(gen, (cin, 2 * cin, 3, 3), 2.0)
            s[p + "0.bias"] = _bias(gen, cin)
            s[p + "2.weight"] = _he(gen, (cin, cin, 3, 3), 2.0)
            s[p + "2.bias"] = _bias(gen, cin)
            s[p + "4.weight"] = _he(gen, (cin, cin, 3, 3), 0.3)
            s[p + "4.bias"] = _bias(gen, cin)
        s["%d.conv.weight" % (first + 4)] = _he(gen, (cin * grow, cin, 1, 1), 1.0)
        s["%d.weight" % (first + 5)] = _he(gen, (cout, cin, 3, 3), 1.0)
    return _calibrate(s, gen, patch, z, w3, decoder_plan(sp["grows"]), sp, out_std)


def _calibrate(s, gen, patch, z, w3, plan, sp, out_std):
    """The last conv (22) scaled so that random N(0, 1) latents give outputs mostly inside the clamp."""
    s["22.weight"] = _he(gen, (3 * patch * patch, w3, 3, 3), 1.0)
    s["22.bias"] = torch.zeros(3 * patch * patch, dtype=torch.float64)
    probe = torch.randn(2, z, 4, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = _run(s, probe, {}, plan, sp["slope"])
    centre, std = (0.0, 2 * out_std) if sp["signed"] else (0.5, out_std)
    s["22.weight"] = s["22.weight"] * (std / max(out.std().item(), 1e-6))
    s["22.bias"] = centre - out.mean(dim=(0, 2, 3)) * (std / max(out.std().item(), 1e-6)) \
        + _bias(gen, 3 * patch * patch)
    return s


def write_model(path, state, decoder, dtype="F32"):
    """A whole TAEHV file: the encoder under 'encoder.', the decoder under 'decoder.'.  Returns both as
    stored (rounded to dtype), unprefixed."""
    enc = {k: V.round_to_dtype(v, dtype) for k, v in state.items()}
    dec = {k: V.round_to_dtype(v, dtype) for k, v in decoder.items()}
    tensors = {"encoder." + k: v for k, v in enc.items()}
    tensors.update({"decoder." + k: v for k, v in dec.items()})
    V.write_safetensors(path, tensors, dtype=dtype)
    return enc, dec


def load_decoder(path):
    """The decoder tensors of a TAEHV file as float64, without the 'decoder.' prefix."""
    tensors, _ = V.read_safetensors(path, key_filter=lambda k: k.startswith("decoder."))
    return {k[len("decoder."):]: v for k, v in tensors.items()}


def write_state(path, state, dtype="F32", decoder_stub=False):
    """Writes `state` under 'encoder.' (the real files' names); returns it as stored (rounded to
    dtype), unprefixed.  decoder_stub adds a few 'decoder.*' tensors, as a full TAEHV file has."""
    stored = {k: V.round_to_dtype(v, dtype) for k, v in state.items()}
    tensors = {"encoder." + k: v for k, v in stored.items()}
    if decoder_stub:
        z = state["17.weight"].shape[0]
        tensors["decoder.1.weight"] = torch.zeros(256, z, 3, 3, dtype=torch.float64)
        tensors["decoder.1.bias"] = torch.zeros(256, dtype=torch.float64)
        tensors["decoder.3.conv.0.weight"] = torch.zeros(256, 512, 3, 3, dtype=torch.float64)
    V.write_safetensors(path, tensors, dtype=dtype)
    return stored


def load_state(path):
    """The encoder tensors of a TAEHV file as float64, without the 'encoder.' prefix."""
    tensors, _ = V.read_safetensors(path, key_filter=lambda k: k.startswith("encoder."))
    return {k[len("encoder."):]: v for k, v in tensors.items()}


def frames_to_input(rgb_u8):
    """T x H x W x 3 uint8 (numpy or torch) -> T x 3 x H x W float64 in [0, 1] (u8 / 255)."""
    x = torch.as_tensor(rgb_u8).to(torch.float64) / 255.0
    return x.permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------- self-test

def selftest():
    for variant, width in (("taew2_1", 16), ("taew2_2", 12), ("taehv1_5", 8), ("lighttaehy1_5", 8),
                           ("taeltx_2", 8)):
        sp = SPECS[variant]
        patch, z, g = sp["patch"], sp["z"], frames_per_latent(variant)
        state = make_state(variant, width, seed=3)
        if variant in ("taew2_1", "taew2_2"):
            assert variant_of(state) == variant
        d = SPATIAL_DOWNSCALE * patch
        gen = torch.Generator().manual_seed(7)
        frames = torch.rand(2 * g + 3, 3, 2 * d, 3 * d, generator=gen, dtype=torch.float64)
        x = torch.rand(2, 3, 4, 8, generator=gen, dtype=torch.float64)
        if patch > 1:
            assert torch.equal(space_to_depth(x, patch), F.pixel_unshuffle(x, patch))
        for end in ("drop", "pad"):
            whole = encode_clip(state, frames, end, variant)
            stream = encode_stream(state, frames, end, variant)
            expect = 2 if end == "drop" else 3
            assert tuple(whole.shape) == (expect, z, 2, 3), whole.shape
            err = (whole - stream).abs().max().item()
            assert err < 1e-12, (variant, end, err)
            # a prefix of the clip gives a prefix of the latents (causal)
            prefix = encode_clip(state, frames[:g], "drop", variant)
            assert (prefix - whole[:1]).abs().max().item() < 1e-12
        # g - 1 frames dropped -> nothing
        assert encode_clip(state, frames[:g - 1], "drop", variant).shape[0] == 0
        # the same weights read as the HunyuanVideo 1.5 twin give other numbers (activation, input range)
        if variant in ("taehv1_5", "lighttaehy1_5"):
            twin = "lighttaehy1_5" if variant == "taehv1_5" else "taehv1_5"
            assert (encode_clip(state, frames, "drop", twin) - whole[:2]).abs().max().item() > 1e-3
        assert (to_raw(from_raw(whole, variant), variant) - whole).abs().max().item() < 1e-12
        print("taehv_reference selftest ok: %s width %d, %d frames per latent, latents %s, std %.3f, |max| %.3f, "
              "raw mean %.3f" % (variant, width, g, tuple(whole.shape), whole.std().item(), whole.abs().max().item(),
                                 to_raw(whole, variant).mean().item()))


def selftest_decoder():
    """Decoder: one latent per call == all at once == other plans; gT - (g-1) frames; prefixes; pixel_shuffle's
    channel order; outputs mostly inside (0, 1)."""
    x = torch.randn(2, 12, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ps = F.pixel_shuffle(x, 2)
    assert all(torch.equal(ps[:, c, r::2, q::2], x[:, c * 4 + r * 2 + q]) for c in range(3) for r in range(2)
               for q in range(2)), "pixel_shuffle channel order"
    for variant, widths, super_ in (("taew2_1", (32, 16, 8, 8), False), ("taew2_2", (24, 16, 8, 8), False),
                                    ("taehv1_5", (16, 8, 8, 8), False), ("lighttaehy1_5", (16, 8, 8, 8), False),
                                    ("taeltx_2", (16, 8, 8, 8), False), ("taew2_2", (16, 8, 8, 8), True),
                                    ("taehv1_5", (16, 8, 8, 8), True)):
        sp = SPECS[variant]
        patch, z, g = sp["patch"], sp["z"], math.prod(sp["grows"])
        dec = make_decoder_state(variant, widths, seed=5, super_=super_)
        assert is_super(dec) == super_
        if variant in ("taew2_1", "taew2_2"):
            assert decoder_variant(dec) == variant
        gen = torch.Generator().manual_seed(9)
        raw = to_raw(torch.randn(6, z, 3, 5, generator=gen, dtype=torch.float64), variant)
        assert (to_raw(from_raw(raw, variant), variant) - raw).abs().max().item() < 1e-12
        lat = from_raw(raw, variant)
        whole = decode_video(dec, lat, variant=variant)
        assert tuple(whole.shape) == (decoded_frames(6, variant), 3, 3 * 8 * patch, 5 * 8 * patch), whole.shape
        worst = 0.0
        for plan in ([1] * 6, [1, 5], [2, 2, 2], [3, 1, 2]):
            worst = max(worst, (decode_video(dec, lat, plan, variant) - whole).abs().max().item())
        assert worst < 1e-12, (variant, worst)
        for t in (1, 2, 3):
            pre = decode_video(dec, lat[:t], variant=variant)
            assert pre.shape[0] == decoded_frames(t, variant) == g * t - (g - 1)
            assert (pre - whole[:pre.shape[0]]).abs().max().item() < 1e-12
        unsat = ((whole > 0) & (whole < 1)).double().mean().item()
        assert unsat > 0.5, (variant, unsat)
        print("taehv_reference selftest ok: %s %sdecoder widths %s, 6 latents -> %s, plans 1x6, 1+5, 2+2+2, 3+1+2 == "
              "all at once (max |diff| %.1e), prefixes give prefixes, %.1f %% of pixels inside (0, 1)"
              % (variant, "super " if super_ else "", widths, tuple(whole.shape), worst, 100 * unsat))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mw = sub.add_parser("make-weights", help="write a random TAEHV encoder checkpoint")
    mw.add_argument("--variant", choices=sorted(VARIANTS), default="taew2_1")
    mw.add_argument("--out", required=True)
    mw.add_argument("--seed", type=int, default=0)
    mw.add_argument("--width", type=int, default=64, help="64 in the real models; smaller for tests")
    mw.add_argument("--dtype", choices=("F32", "F16", "BF16"), default="F32")
    mw.add_argument("--decoder-stub", action="store_true", help="add a few decoder.* tensors")
    mw.add_argument("--decoder-widths", help="a whole decoder of these widths, e.g. 256,128,64,64 or 32,16,8,8")
    mw.add_argument("--super", action="store_true", help="the decoder in the super layout (512,256,128,64 real)")
    sub.add_parser("selftest")
    args = ap.parse_args(argv)
    if args.cmd == "selftest":
        selftest()
        selftest_decoder()
    elif args.decoder_widths:
        widths = tuple(int(v) for v in args.decoder_widths.split(","))
        write_model(args.out, make_state(args.variant, args.width, args.seed),
                    make_decoder_state(args.variant, widths, args.seed, super_=args.super), args.dtype)
        print("wrote %s (%s, width %d, decoder widths %s, %s)" % (args.out, args.variant, args.width, widths,
                                                                  args.dtype))
    else:
        write_state(args.out, make_state(args.variant, args.width, args.seed), args.dtype, args.decoder_stub)
        print("wrote %s (%s, width %d, %s)" % (args.out, args.variant, args.width, args.dtype))


if __name__ == "__main__":
    main(sys.argv[1:])
