#!/usr/bin/python3
"""Float64 reference of the TAEHV video encoders (taew2_1, taew2_2) and a test-weight generator.

Written from the architecture description in docs/video-vaes-taehv.md, not from the C++ engine:
torch.nn.functional in float64.  Tensor names are the indices of upstream's ``encoder`` nn.Sequential
(``encoder.0.weight``, ``encoder.2.conv.weight``, ``encoder.4.conv.0.weight``, ...).

  encode_clip(state, frames, end="drop"|"pad")   one clip, T x 3 x H x W in [0, 1] -> the model's
                                                  normalised latents, T_lat x z x H/d x W/d
  encode_stream(state, frames, ...)               the same frame by frame (MemBlock state, pool buffers)
  to_raw(latents, variant)                        raw = x * std + mean (the Wan VAE's raw mean)
  make_state(variant, width, seed)                random weights in the real layout, activations O(1)
  write_state(path, state, dtype)                 .safetensors in F32 / F16 / BF16

CLI:
  python3 tests/python/taehv_reference.py make-weights --variant taew2_1 --out X.safetensors --seed 1
          [--width 16] [--dtype F32|F16|BF16]
  python3 tests/python/taehv_reference.py selftest

No real TAEHV weights are used anywhere: every test runs on generated ones.  Run with /usr/bin/python3.
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


def _mem(state, n, x, past):
    """MemBlock: relu(conv4(relu(conv2(relu(conv0([x, past]))))) + x); past = the previous frame's input."""
    p = "%d.conv." % n
    h = F.relu(F.conv2d(torch.cat([x, past], 1), state[p + "0.weight"], state[p + "0.bias"], padding=1))
    h = F.relu(F.conv2d(h, state[p + "2.weight"], state[p + "2.bias"], padding=1))
    h = F.conv2d(h, state[p + "4.weight"], state[p + "4.bias"], padding=1)
    skip = F.conv2d(x, state["%d.skip.weight" % n]) if "%d.skip.weight" % n in state else x
    return F.relu(h + skip)


def _run(state, x, memory):
    """All layers over T frames (a multiple of 4) at once. memory: MemBlock index -> last input (or absent)."""
    for n, kind, arg in PLAN:
        if kind == "conv":
            x = _conv(state, n, x, arg)
        elif kind == "relu":
            x = F.relu(x)
        elif kind == "pool":
            x = _pool(state, n, x, arg)
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
    sub.add_parser("selftest")
    args = ap.parse_args(argv)
    if args.cmd == "selftest":
        selftest()
    else:
        write_state(args.out, make_state(args.variant, args.width, args.seed), args.dtype, args.decoder_stub)
        print("wrote %s (%s, width %d, %s)" % (args.out, args.variant, args.width, args.dtype))


if __name__ == "__main__":
    main(sys.argv[1:])
