#!/usr/bin/env python3
"""Float64 reference of the TAEHV video encoders and decoders (taew2_1, taew2_2) and a test-weight generator.

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

# variant -> (input patch size, latent channels, mean, std)
VARIANTS = {
    "taew2_1": (1, 16, WAN21_MEAN, WAN21_STD),
    "taew2_2": (2, 48, WAN22_MEAN, WAN22_STD),
}

# The encoder Sequential: (index, kind, argument).  conv: 3x3 (argument = stride); pool: TPool
# (argument = frames merged); mem: MemBlock; relu.  The last TPool merges 1 frame (a plain 1x1 conv).
PLAN = ([(0, "conv", 1), (1, "relu", None)]
        + [step for first, pool in ((2, 2), (7, 2), (12, 1))
           for step in [(first, "pool", pool), (first + 1, "conv", 2),
                        (first + 2, "mem", None), (first + 3, "mem", None), (first + 4, "mem", None)]]
        + [(17, "conv", 1)])
FRAMES_PER_LATENT = 4   # the product of the pool arguments
SPATIAL_DOWNSCALE = 8   # three stride-2 convs (times the patch size)


def variant_of(state):
    """The variant whose shapes `state` (keys without 'encoder.') has: from encoder.0's input channels."""
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
    _, z, mean, std = VARIANTS[variant]
    shape = (1, z) + (1,) * (latents.dim() - 2)
    return (latents * torch.tensor(std, dtype=latents.dtype).view(shape)
            + torch.tensor(mean, dtype=latents.dtype).view(shape))


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


def _mem(state, n, x, past):
    """MemBlock: relu(conv4(relu(conv2(relu(conv0([x, past]))))) + x); past = the previous frame's input."""
    p = "%d.conv." % n
    h = F.relu(F.conv2d(torch.cat([x, past], 1), state[p + "0.weight"], state[p + "0.bias"], padding=1))
    h = F.relu(F.conv2d(h, state[p + "2.weight"], state[p + "2.bias"], padding=1))
    h = F.conv2d(h, state[p + "4.weight"], state[p + "4.bias"], padding=1)
    skip = F.conv2d(x, state["%d.skip.weight" % n]) if "%d.skip.weight" % n in state else x
    return F.relu(h + skip)


def _run(state, x, memory, plan=PLAN):
    """All layers of `plan` over T frames at once (encoder: T a multiple of 4). memory: MemBlock index -> last
    input (or absent); a MemBlock sees the previous frame AT ITS OWN RATE."""
    for n, kind, arg in plan:
        if kind == "conv":
            x = _conv(state, n, x, arg)
        elif kind == "relu":
            x = F.relu(x)
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
            x = _mem(state, n, x, past)
    return x


def encode_clip(state, frames, end="drop"):
    """One whole clip, frames T x 3 x H x W float64 in [0, 1] -> normalised latents T_lat x z x h x w.

    end="drop": frames after the last complete group of 4 are dropped; end="pad": the last group is
    completed by repeating the clip's last frame (upstream's encode_video).  T_lat may be 0."""
    patch = patch_of(state)
    g = FRAMES_PER_LATENT
    t = frames.shape[0]
    if end == "pad" and t % g:
        frames = torch.cat([frames, frames[-1:].expand(g - t % g, -1, -1, -1)], 0)
    else:
        frames = frames[: t // g * g]
    if frames.shape[0] == 0:
        z = state["17.weight"].shape[0]
        h, w = frames.shape[2] // (SPATIAL_DOWNSCALE * patch), frames.shape[3] // (SPATIAL_DOWNSCALE * patch)
        return torch.zeros(0, z, h, w, dtype=torch.float64)
    return _run(state, space_to_depth(frames, patch), {})


def encode_stream(state, frames, end="drop"):
    """The same clip fed one frame at a time through a stateful loop (MemBlock inputs kept per block,
    frames waiting in each TPool until it has enough).  Returns the same latents as encode_clip."""
    patch = patch_of(state)
    memory, waiting, out = {}, {}, []
    t = frames.shape[0]
    if end == "pad" and t % FRAMES_PER_LATENT:
        frames = torch.cat([frames, frames[-1:].expand(FRAMES_PER_LATENT - t % FRAMES_PER_LATENT, -1, -1, -1)])

    def push(x, start):
        for pos in range(start, len(PLAN)):
            n, kind, arg = PLAN[pos]
            if kind == "conv":
                x = _conv(state, n, x, arg)
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "pool":
                waiting.setdefault(n, []).append(x)
                if len(waiting[n]) < arg:
                    return None
                x = _pool(state, n, torch.cat(waiting.pop(n), 0), arg)
            else:
                prev = memory.get(n)
                memory[n] = x
                x = _mem(state, n, x, torch.zeros_like(x) if prev is None else prev)
        return x

    for i in range(frames.shape[0]):
        y = push(space_to_depth(frames[i:i + 1], patch), 0)
        if y is not None:
            out.append(y)
    z = state["17.weight"].shape[0]
    if not out:
        return torch.zeros(0, z, frames.shape[2] // (SPATIAL_DOWNSCALE * patch),
                           frames.shape[3] // (SPATIAL_DOWNSCALE * patch),
                           dtype=torch.float64)
    return torch.cat(out, 0)


# ------------------------------------------------------------------------------- decoder (float64)
# From a description of madebyollin/taehv taehv.py: the ``decoder`` Sequential and ``decode_video``.

DECODER_PLAN = ([(0, "clamp", None), (1, "conv", 1), (2, "relu", None)]
                + [step for first, grow in ((3, 1), (9, 2), (15, 2))
                   for step in [(first, "mem", None), (first + 1, "mem", None), (first + 2, "mem", None),
                                (first + 3, "up", None), (first + 4, "grow", grow), (first + 5, "conv", 1)]]
                + [(21, "relu", None), (22, "conv", 1)])
FRAMES_TO_TRIM = 3   # 2 ** (number of TGrow(.., 2)) - 1: the first frames decode_video drops


def decoder_patch(dec):
    """The output patch size: decoder.22 gives 3 * p * p channels."""
    return int(round(math.sqrt(dec["22.weight"].shape[0] / 3)))


def decoder_variant(dec):
    z, p = dec["1.weight"].shape[1], decoder_patch(dec)
    for name, (patch, zz, _, _) in VARIANTS.items():
        if patch == p and zz == z:
            return name
    raise ValueError("no known TAEHV variant has %d latent channels and %dx%d output patches" % (z, p, p))


def decode_video(dec, latents, plan=None):
    """Normalised latents T x z x h x w (float64) -> frames (4T - 3) x 3 x H x W in [0, 1].

    The decoder runs over the latents in time order (plan: sizes of the consecutive calls sharing the MemBlock
    memory; default all at once), clamp(0, 1), pixel_shuffle(p) (channel c*p*p + row*p + col), then the first
    3 frames are dropped."""
    t = latents.shape[0]
    plan = [t] if plan is None else list(plan)
    if sum(plan) != t:
        raise ValueError("plan %s covers %d latents, not %d" % (plan, sum(plan), t))
    memory, outs, pos = {}, [], 0
    for size in plan:
        if size:
            outs.append(_run(dec, latents[pos:pos + size].to(torch.float64), memory, DECODER_PLAN))
        pos += size
    x = torch.cat(outs, 0).clamp(0.0, 1.0)
    p = decoder_patch(dec)
    if p > 1:
        x = F.pixel_shuffle(x, p)
    return x[FRAMES_TO_TRIM:]


def decoded_frames(t):
    """Frames T latents decode to: 4T - 3."""
    return max(4 * t - FRAMES_TO_TRIM, 0)


def from_raw(latents, variant):
    """(raw - mean) / std: the model's normalised latent space (inverse of to_raw)."""
    _, z, mean, std = VARIANTS[variant]
    shape = (1, z) + (1,) * (latents.dim() - 2)
    return ((latents - torch.tensor(mean, dtype=latents.dtype).view(shape))
            / torch.tensor(std, dtype=latents.dtype).view(shape))


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
    for first, pool in ((2, 2), (7, 2), (12, 1)):
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


def make_decoder_state(variant="taew2_1", widths=(256, 128, 64, 64), seed=0, out_std=0.25):
    """Random decoder weights in TAEHV's layout (keys without the 'decoder.' prefix), float64.

    Scales as the encoder's (He gains; each MemBlock's last conv small); the final conv is calibrated on
    random N(0, 1) latents so that the output has mean 0.5 and std `out_std`: mostly inside (0, 1), so that
    the clamp hides little."""
    patch, z, _, _ = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    w0, w1, w2, w3 = widths
    s = {"1.weight": _he(gen, (w0, z, 3, 3), 2.0), "1.bias": _bias(gen, w0)}
    for first, grow, cin, cout in ((3, 1, w0, w1), (9, 2, w1, w2), (15, 2, w2, w3)):
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
    s["22.weight"] = _he(gen, (3 * patch * patch, w3, 3, 3), 1.0)
    s["22.bias"] = torch.zeros(3 * patch * patch, dtype=torch.float64)
    probe = torch.randn(2, z, 4, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = _run(s, probe, {}, DECODER_PLAN)
    s["22.weight"] = s["22.weight"] * (out_std / max(out.std().item(), 1e-6))
    s["22.bias"] = 0.5 - out.mean(dim=(0, 2, 3)) * (out_std / max(out.std().item(), 1e-6)) \
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
    for variant, width in (("taew2_1", 16), ("taew2_2", 12)):
        patch, z, _, _ = VARIANTS[variant]
        state = make_state(variant, width, seed=3)
        assert variant_of(state) == variant
        d = SPATIAL_DOWNSCALE * patch
        gen = torch.Generator().manual_seed(7)
        frames = torch.rand(11, 3, 2 * d, 3 * d, generator=gen, dtype=torch.float64)
        x = torch.rand(2, 3, 4, 6, generator=gen, dtype=torch.float64)
        if patch > 1:
            assert torch.equal(space_to_depth(x, 2), F.pixel_unshuffle(x, 2))
        for end in ("drop", "pad"):
            whole = encode_clip(state, frames, end)
            stream = encode_stream(state, frames, end)
            expect = 2 if end == "drop" else 3
            assert tuple(whole.shape) == (expect, z, 2, 3), whole.shape
            err = (whole - stream).abs().max().item()
            assert err < 1e-12, (variant, end, err)
            # a prefix of the clip gives a prefix of the latents (causal)
            prefix = encode_clip(state, frames[:4], "drop")
            assert (prefix - whole[:1]).abs().max().item() < 1e-12
        # 2..3 frames dropped -> nothing
        assert encode_clip(state, frames[:3]).shape[0] == 0
        print("taehv_reference selftest ok: %s width %d, latents %s, std %.3f, |max| %.3f, raw mean %.3f"
              % (variant, width, tuple(whole.shape), whole.std().item(), whole.abs().max().item(),
                 to_raw(whole, variant).mean().item()))


def selftest_decoder():
    """Decoder: one latent per call == all at once == other plans; 4T - 3 frames; prefixes; pixel_shuffle's
    channel order; outputs mostly inside (0, 1)."""
    x = torch.randn(2, 12, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ps = F.pixel_shuffle(x, 2)
    assert all(torch.equal(ps[:, c, r::2, q::2], x[:, c * 4 + r * 2 + q]) for c in range(3) for r in range(2)
               for q in range(2)), "pixel_shuffle channel order"
    for variant, widths in (("taew2_1", (32, 16, 8, 8)), ("taew2_2", (24, 16, 8, 8))):
        patch, z, _, _ = VARIANTS[variant]
        dec = make_decoder_state(variant, widths, seed=5)
        assert decoder_variant(dec) == variant
        gen = torch.Generator().manual_seed(9)
        raw = to_raw(torch.randn(6, z, 3, 5, generator=gen, dtype=torch.float64), variant)
        assert (to_raw(from_raw(raw, variant), variant) - raw).abs().max().item() < 1e-12
        lat = from_raw(raw, variant)
        whole = decode_video(dec, lat)
        assert tuple(whole.shape) == (decoded_frames(6), 3, 3 * 8 * patch, 5 * 8 * patch), whole.shape
        worst = 0.0
        for plan in ([1] * 6, [1, 5], [2, 2, 2], [3, 1, 2]):
            worst = max(worst, (decode_video(dec, lat, plan) - whole).abs().max().item())
        assert worst < 1e-12, (variant, worst)
        for t in (1, 2, 3):
            pre = decode_video(dec, lat[:t])
            assert pre.shape[0] == decoded_frames(t) == 4 * t - 3
            assert (pre - whole[:pre.shape[0]]).abs().max().item() < 1e-12
        unsat = ((whole > 0) & (whole < 1)).double().mean().item()
        assert unsat > 0.5, (variant, unsat)
        print("taehv_reference selftest ok: %s decoder widths %s, 6 latents -> %s, plans 1x6, 1+5, 2+2+2, 3+1+2 == "
              "all at once (max |diff| %.1e), prefixes give prefixes, %.1f %% of pixels inside (0, 1)"
              % (variant, widths, tuple(whole.shape), worst, 100 * unsat))


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
    sub.add_parser("selftest")
    args = ap.parse_args(argv)
    if args.cmd == "selftest":
        selftest()
        selftest_decoder()
    elif args.decoder_widths:
        widths = tuple(int(v) for v in args.decoder_widths.split(","))
        write_model(args.out, make_state(args.variant, args.width, args.seed),
                    make_decoder_state(args.variant, widths, args.seed), args.dtype)
        print("wrote %s (%s, width %d, decoder widths %s, %s)" % (args.out, args.variant, args.width, widths,
                                                                  args.dtype))
    else:
        write_state(args.out, make_state(args.variant, args.width, args.seed), args.dtype, args.decoder_stub)
        print("wrote %s (%s, width %d, %s)" % (args.out, args.variant, args.width, args.dtype))


if __name__ == "__main__":
    main(sys.argv[1:])
