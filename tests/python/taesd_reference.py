#!/usr/bin/env python3
"""Float64 reference of the TAESD tiny autoencoders (encoder and decoder) and test-weight generator.

Written from the architecture description in shared/models/README.md ("Reference architecture"), not from
the C++ engine: torch.nn.functional in float64.  Keys are nn.Sequential indices (``1.conv.0.weight``).

  encoder_forward(state, x01)        RGB in [0, 1], N x 3 x H x W -> the model's (scaled) latent
  decoder_forward(state, z)          the model's latent -> RGB of about [0, 1]
  make_encoder_state / make_decoder_state   random weights of the same layout (optionally TAEF2 pools)
  LATENT_SPACES                      family -> (ComfyUI vae_scale, vae_shift, latent channels)
  to_raw / from_raw                  ComfyUI's TAESD VAE: raw = out / scale + shift; in = (raw - shift) * scale
  comfy_u8                           ComfyUI's decode output to 8 bits, with the distance to a rounding boundary

Run with scripts/python.
"""

import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vae_reference as V  # noqa: E402  (safetensors I/O and frame helpers only)

# family -> (vae_scale, vae_shift, channels); taef2 and taesana have no scale or shift.
LATENT_SPACES = {
    "taesd": (0.18215, 0.0, 4),
    "taesdxl": (0.13025, 0.0, 4),
    "taesd3": (1.5305, 0.0609, 16),
    "taef1": (0.3611, 0.1159, 16),
    "taef2": (1.0, 0.0, 32),
    "taesana": (1.0, 0.0, 32),
}

POOL_GROUPS = 4
POOL_EPS = 1e-5


def to_raw(out, family):
    scale, shift, _ = LATENT_SPACES[family]
    return out / scale + shift


def from_raw(raw, family):
    scale, shift, _ = LATENT_SPACES[family]
    return (raw - shift) * scale


# ------------------------------------------------------------------------------------------ layers

def _conv(state, name, x, stride=1):
    w = state[name + ".weight"]
    b = state.get(name + ".bias")
    return F.conv2d(x, w, b, stride=stride, padding=w.shape[-1] // 2)


def _block(state, n, x):
    """Block: optional TAEF2 pool first (x += pool(x)), then ReLU(conv(ReLU(conv(ReLU(conv(x))))) + skip(x))."""
    p = "%d." % n
    if p + "pool.0.weight" in state:
        h = F.conv2d(x, state[p + "pool.0.weight"])
        h = F.group_norm(h, POOL_GROUPS, state[p + "pool.1.weight"], state[p + "pool.1.bias"], eps=POOL_EPS)
        x = x + F.conv2d(F.relu(h), state[p + "pool.3.weight"])
    h = F.relu(_conv(state, p + "conv.0", x))
    h = F.relu(_conv(state, p + "conv.2", h))
    h = _conv(state, p + "conv.4", h)
    skip = F.conv2d(x, state[p + "skip.weight"]) if p + "skip.weight" in state else x
    return F.relu(h + skip)


def is_f32_encoder(state):
    return "1.conv.0.weight" not in state and "4.conv.0.weight" in state


def encoder_forward(state, x):
    """x: float64 N x 3 x H x W in [0, 1]."""
    if is_f32_encoder(state):
        # TAESana: conv s2, ReLU, conv s2, ReLU, Block 4, then stages at 5, 9, 13, conv 17.
        x = F.relu(_conv(state, "0", x, stride=2))
        x = F.relu(_conv(state, "2", x, stride=2))
        x = _block(state, 4, x)
        starts, last = (5, 9, 13), 17
    else:
        x = _conv(state, "0", x)
        x = _block(state, 1, x)
        starts, last = (2, 6, 10), 14
    for s in starts:
        x = _conv(state, str(s), x, stride=2)
        for b in range(s + 1, s + 4):
            x = _block(state, b, x)
    return _conv(state, str(last), x)


def decoder_forward(state, z):
    """z: float64 N x C x h x w in the model's latent space -> N x 3 x 8h x 8w."""
    x = 3.0 * torch.tanh(z / 3.0)
    x = F.relu(_conv(state, "1", x))
    for s in (3, 8, 13):
        for b in range(s, s + 3):
            x = _block(state, b, x)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = _conv(state, str(s + 4), x)
    x = _block(state, 18, x)
    return _conv(state, "19", x)


def comfy_u8(x):
    """ComfyUI's pixels from a [0, 1] decoder output (float64 N x 3 x H x W): clamp to [0, 1], x 255, truncate.

    Returns (uint8 N x H x W x 3, distance of each value to the nearest truncation boundary in [0, 1] units).
    """
    v = x.permute(0, 2, 3, 1).numpy() * 255.0
    vc = np.clip(v, 0.0, 255.0)
    u8 = np.floor(vc).astype(np.uint8)
    # Outside [0, 1] the nearest boundary is the clamp's (0 or 1); inside, the nearest k / 255.
    dist = (np.abs(v - vc) + np.abs(vc - np.rint(vc))) / 255.0
    return u8, dist


def frames_to_input(rgb_u8):
    """uint8 N x H x W x 3 -> float64 N x 3 x H x W in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb_u8)).permute(0, 3, 1, 2).to(torch.float64) / 255.0


def crop(rgb_u8, multiple):
    """ComfyUI's centre crop to multiples of ``multiple`` (N x H x W x 3)."""
    h, w = rgb_u8.shape[1:3]
    kh, kw = h // multiple * multiple, w // multiple * multiple
    oh, ow = (h % multiple) // 2, (w % multiple) // 2
    return rgb_u8[:, oh:oh + kh, ow:ow + kw]


def load_state(path):
    """Tensors of a TAESD file as float64 (any prefix 'encoder.'/'decoder.'/'taesd_*.' removed by the caller)."""
    tensors, meta = V.read_safetensors(path)
    return tensors, meta


def strip_prefix(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------- random weights

def _he(gen, shape, gain=2.0):
    fan_in = shape[1] * shape[2] * shape[3]
    return torch.randn(shape, generator=gen, dtype=torch.float64) * math.sqrt(gain / fan_in)


def _bias(gen, n, scale=0.05):
    return torch.randn(n, generator=gen, dtype=torch.float64) * scale


def _add_block(state, gen, n, width, pool_hidden=0):
    p = "%d." % n
    if pool_hidden:
        state[p + "pool.0.weight"] = _he(gen, (pool_hidden, width, 1, 1), 1.0)
        state[p + "pool.1.weight"] = 1.0 + _bias(gen, pool_hidden, 0.1)
        state[p + "pool.1.bias"] = _bias(gen, pool_hidden, 0.1)
        state[p + "pool.3.weight"] = _he(gen, (width, pool_hidden, 1, 1), 0.5)
    for i, gain in ((0, 2.0), (2, 2.0), (4, 0.3)):   # the last conv small: residual sums stay bounded
        state[p + "conv.%d.weight" % i] = _he(gen, (width, width, 3, 3), gain)
        state[p + "conv.%d.bias" % i] = _bias(gen, width)


def make_encoder_state(channels=4, width=64, pool_blocks=(), pool_hidden=256, seed=0):
    """Random TAESD-layout encoder weights (float64)."""
    gen = torch.Generator().manual_seed(seed)
    state = {"0.weight": _he(gen, (width, 3, 3, 3)), "0.bias": _bias(gen, width)}
    _add_block(state, gen, 1, width, pool_hidden if 1 in pool_blocks else 0)
    for s in (2, 6, 10):
        state["%d.weight" % s] = _he(gen, (width, width, 3, 3), 1.0)
        for b in range(s + 1, s + 4):
            _add_block(state, gen, b, width, pool_hidden if b in pool_blocks else 0)
    state["14.weight"] = _he(gen, (channels, width, 3, 3), 1.0)
    state["14.bias"] = _bias(gen, channels)
    return state


def make_decoder_state(channels=4, width=64, pool_blocks=(), pool_hidden=256, seed=0):
    """Random TAESD-layout decoder weights (float64) whose output lies around [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    state = {"1.weight": _he(gen, (width, channels, 3, 3)), "1.bias": _bias(gen, width)}
    for s in (3, 8, 13):
        for b in range(s, s + 3):
            _add_block(state, gen, b, width, pool_hidden if b in pool_blocks else 0)
        state["%d.weight" % (s + 4)] = _he(gen, (width, width, 3, 3), 1.0)
    _add_block(state, gen, 18, width, pool_hidden if 18 in pool_blocks else 0)
    # Zero-mean filters over the non-negative Block output: pixels centred near the 0.5 bias.
    w = _he(gen, (3, width, 3, 3), 0.3)
    state["19.weight"] = w - w.mean(dim=(1, 2, 3), keepdim=True)
    state["19.bias"] = torch.full((3,), 0.5, dtype=torch.float64)
    return state


def write_state(path, state, dtype="F32", prefix="", metadata=None):
    """Writes the state (optionally under a prefix); returns it as stored (rounded to dtype), unprefixed."""
    stored = {k: V.round_to_dtype(v, dtype) for k, v in state.items()}
    V.write_safetensors(path, {prefix + k: v for k, v in stored.items()}, dtype=dtype, metadata=metadata)
    return stored


def selftest():
    """Shapes and the pool branch, quickly."""
    enc = make_encoder_state(4, 16, seed=1)
    x = torch.rand(1, 3, 72, 56, dtype=torch.float64)
    z = encoder_forward(enc, x)
    assert tuple(z.shape) == (1, 4, 9, 7), z.shape
    dec = make_decoder_state(32, 16, pool_blocks=(3, 4, 5), pool_hidden=64, seed=2)
    y = decoder_forward(dec, torch.randn(1, 32, 9, 7, dtype=torch.float64))
    assert tuple(y.shape) == (1, 3, 72, 56), y.shape
    print("taesd_reference selftest ok: latent %s, pixels %s, pixel mean %.3f std %.3f"
          % (tuple(z.shape), tuple(y.shape), y.mean().item(), y.std().item()))


if __name__ == "__main__":
    selftest()
