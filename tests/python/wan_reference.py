#!/usr/bin/env python3
"""Float64 reference of the Wan 2.1 and Wan 2.2 causal video VAE encoders and decoders.

Encoder: written from the architecture description in shared/notes/video-vae-semantics.md.  Decoder: written
from a description of the official code (Wan-Video/Wan2.1 wan/modules/vae.py ``Decoder3d``, ``Resample``
upsample2d/upsample3d with its 'Rep' feat-cache rule, ``WanVAE_.decode``; Wan-Video/Wan2.2
wan/modules/vae2_2.py ``Decoder3d``, ``Up_ResidualBlock``, ``DupUp3D``, the unpatchify) -- not from any C++
code and not from upstream code; torch.nn.functional in float64.  Weights: canonical (official, unprefixed)
names as produced by wan_weights.make_state / load_wan_state.

Two independent formulations, which the self-test makes agree:

  encode_whole_clip(state, x)      no chunking and no state: every causal 3x3x3 conv runs over the whole
                                   time axis with 2 zero frames in front; downsample3d is y0 = x0,
                                   y_k = Conv(x_{2k-2}, x_{2k-1}, x_{2k}); Wan 2.2's AvgDown3D pairs
                                   (pad, x0), (x1, x2), ...; frames past 1 + 4*((T-1)//4) are dropped.
  encode_chunked(state, x, plan)   the official feature-cache protocol: chunks fed one after another
                                   (default plan: frame 0 alone, then chunks of 4), each causal conv keeping
                                   the last frames of its input, each downsample3d passing its first chunk
                                   through unchanged and later prepending its last remembered frame.

x is float64 N x 3 x T x H x W in [-1, 1] (H, W multiples of 8 for 2.1, 16 for 2.2).  Both return the raw
mean, N x z x T_lat x h x w.

  frames_to_input(frames_u8, variant)   N x H x W x 3 uint8 -> ComfyUI centre crop -> 1 x 3 x N x H x W
  encode_frames(state, frames_u8, ...)  the above + encode -> T_lat x z x h x w (raw mean, float64)
  normalise(latents, variant)           (mean - mu_c) / sigma_c (Wan 2.1's 16 values, Wan 2.2's 48 values)
  latent_shape(variant, n, H, W, z)     T_lat, z, h, w after the crop

Decoder (raw latents in, as ComfyUI's LATENT; the official decode un-normalises first):

  decode_whole_clip(state, z)          no state: causal convs over the whole time axis; each upsample3d passes
                                       frame 0 through and runs its time conv over frames 1.. with 2 zero
                                       frames in front (2 output frames each); DupUp3D drops ft - 1 frames.
  decode_chunked(state, z, plan)       the official feat-cache protocol, default one latent per call
                                       (WanVAE_.decode); the self-test shows plans [1, rest], [1, 2, 2], ...
                                       (latent 0 alone first) equal it to ~3e-15.
  decode_latents(state, lat, images=)  T x z x h x w raw -> F x 3 x H x W in [0, 1] (ComfyUI's
                                       clamp((x + 1) / 2, 0, 1) after the official clamp(-1, 1));
                                       F = 1 + 4 (T - 1); images=True: each latent its own clip (F = T).
  CLI: --model M --latents IN.npy [--latent-format raw|wan21|wan22] [--images] --out OUT.f32

Run ``scripts/python tests/python/wan_reference.py --self-test``.
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vae_reference as V  # noqa: E402  (crop rule)
import wan_weights as W  # noqa: E402

SPATIAL = {"2.1": 8, "2.2": 16}

# Wan 2.1 (note: W21 class WanVAE; same in ComfyUI Wan21 and the diffusers config).
WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
# Wan 2.2 (taken from ComfyUI comfy/latent_formats.py class Wan22 and compared value by value with Wan2.2
# wan/modules/vae2_2.py class Wan2_2_VAE; both tables agree).
WAN22_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
              -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
              -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
              -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
              0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
WAN22_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
             0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
             0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]
NORMALISATION = {"2.1": (WAN21_MEAN, WAN21_STD), "2.2": (WAN22_MEAN, WAN22_STD)}


# ------------------------------------------------------------------------------------------ shared layers

def rms_norm(x, gamma):
    """Channel vector at each position / max(||v||, 1e-12) * sqrt(C) * gamma (no bias)."""
    return F.normalize(x, dim=1) * math.sqrt(x.shape[1]) * gamma


def frames_fold(x):
    """N x C x T x H x W -> (N T) x C x H x W."""
    n, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)


def frames_unfold(y, n):
    nt, c, h, w = y.shape
    return y.reshape(n, nt // n, c, h, w).permute(0, 2, 1, 3, 4)


def spatial_down(state, p, x):
    """downsample2d: per frame, zero-pad 1 column right and 1 row bottom, 3x3 conv stride 2."""
    n = x.shape[0]
    y = F.pad(frames_fold(x), (0, 1, 0, 1))
    y = F.conv2d(y, state[p + ".resample.1.weight"], state[p + ".resample.1.bias"], stride=2)
    return frames_unfold(y, n)


def attention(state, p, x):
    """Per-frame single-head self-attention over the h*w tokens of each frame, residual add."""
    n, c, t, h, w = x.shape
    y = frames_fold(x)
    y = rms_norm(y, state[p + ".norm.gamma"])
    qkv = F.conv2d(y, state[p + ".to_qkv.weight"], state[p + ".to_qkv.bias"])
    q, k, v = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]
    q = q.flatten(2).transpose(1, 2)  # (N T) x hw x C
    k = k.flatten(2).transpose(1, 2)
    v = v.flatten(2).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
    o = (a @ v).transpose(1, 2).reshape(n * t, c, h, w)
    o = F.conv2d(o, state[p + ".proj.weight"], state[p + ".proj.bias"])
    return x + frames_unfold(o, n)


def patchify(x):
    """2x2 space-to-depth: channel c*4 + col*2 + row at (y, x) = pixel (2y + row, 2x + col) of channel c."""
    n, c, t, h, w = x.shape
    y = x.reshape(n, c, t, h // 2, 2, w // 2, 2)          # n c t Y row X col
    y = y.permute(0, 1, 6, 4, 2, 3, 5)                      # n c col row t Y X
    return y.reshape(n, c * 4, t, h // 2, w // 2)


def avg_down_explicit(x, temporal, cout):
    """Wan 2.2 AvgDown3D as the note states it per level: spatial only (cout = C): the 2x2 average of each
    channel; temporal (cout = 2C): output channel 2c + s is the 2x2 average of channel c at slot s of each
    frame pair, with one zero frame padded in front when T is odd."""
    c = x.shape[1]
    if temporal:
        assert cout == 2 * c, (cout, c)
        if x.shape[2] % 2:
            x = F.pad(x, (0, 0, 0, 0, 1, 0))
        pooled = F.avg_pool3d(x, (1, 2, 2))                   # n c T h w
        n, _, t, h, w = pooled.shape
        pairs = pooled.reshape(n, c, t // 2, 2, h, w)        # slot s = frame 2k + s
        return pairs.permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * c, t // 2, h, w)
    assert cout == c, (cout, c)
    return F.avg_pool3d(x, (1, 2, 2))


def avg_down_generic(x, ft, fs, cout):
    """Wan 2.2 AvgDown3D in its general form: pad ft - T mod ft zero frames in front, space-to-depth by
    (ft, fs, fs) giving channel c*F + t*fs*fs + y*fs + x (F = ft*fs*fs), then the mean of each run of
    C*F/cout consecutive channels."""
    pad = (ft - x.shape[2] % ft) % ft
    x = F.pad(x, (0, 0, 0, 0, pad, 0))
    n, c, t, h, w = x.shape
    y = x.reshape(n, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    fac = ft * fs * fs
    y = y.reshape(n, c * fac, t // ft, h // fs, w // fs)
    g = c * fac // cout
    return y.reshape(n, cout, g, t // ft, h // fs, w // fs).mean(dim=2)


def level_plan(state):
    """[(block prefixes, resample prefix or None, temporal, cout)] for the 4 levels."""
    arch = W.infer_arch(state)
    v, w = arch["variant"], arch["widths"]
    out = []
    for level in range(4):
        blocks = [W.block_prefix(v, level, j) for j in (0, 1)]
        res = W.resample_prefix(v, level) if level < 3 else None
        out.append((blocks, res, level < 3 and W.TEMPORAL[level], w[level]))
    return arch, out


def prepare_input(state, x):
    arch = W.infer_arch(state)
    m = SPATIAL[arch["variant"]]
    if x.shape[3] % m or x.shape[4] % m:
        raise ValueError("H, W = %d, %d must be multiples of %d" % (x.shape[3], x.shape[4], m))
    x = x.to(state["encoder.conv1.weight"].dtype)  # float64 but for a caller's float32 experiment
    if arch["variant"] == "2.2":
        x = patchify(x)
    return arch, x


def vae_conv1(state, x, z):
    y = F.conv3d(x, state["conv1.weight"], state["conv1.bias"])
    return y[:, :z]


# ------------------------------------------------------------------------------------------ (a) whole clip

def causal_conv_whole(state, p, x):
    """3x3x3 conv, 2 zero frames in front, 1 pixel zero padding around."""
    return F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), state[p + ".weight"], state[p + ".bias"])


def resblock_whole(state, p, x):
    h = x
    if p + ".shortcut.weight" in state:
        h = F.conv3d(x, state[p + ".shortcut.weight"], state[p + ".shortcut.bias"])
    r = F.silu(rms_norm(x, state[p + ".residual.0.gamma"]))
    r = causal_conv_whole(state, p + ".residual.2", r)
    r = F.silu(rms_norm(r, state[p + ".residual.3.gamma"]))
    r = causal_conv_whole(state, p + ".residual.6", r)
    return r + h


def resample_whole(state, p, x, temporal):
    s = spatial_down(state, p, x)
    if not temporal:
        return s
    # y0 = s0; y_k = Conv(s_{2k-2}, s_{2k-1}, s_{2k}) for k >= 1, which is a stride-2 valid conv over s.
    if s.shape[2] % 2 != 1:
        raise ValueError("downsample3d over a whole clip needs an odd frame count, got %d" % s.shape[2])
    if s.shape[2] == 1:
        return s
    rest = F.conv3d(s, state[p + ".time_conv.weight"], state[p + ".time_conv.bias"], stride=(2, 1, 1))
    return torch.cat([s[:, :, :1], rest], dim=2)


def encode_whole_clip(state, x):
    """Raw mean N x z x T_lat x h x w of float64 N x 3 x T x H x W in [-1, 1], with no chunking."""
    arch, x = prepare_input(state, x)
    t = x.shape[2]
    x = x[:, :, :1 + 4 * ((t - 1) // 4)]
    _, levels = level_plan(state)
    x = causal_conv_whole(state, "encoder.conv1", x)
    for blocks, res, temporal, cout in levels:
        x_in = x
        for b in blocks:
            x = resblock_whole(state, b, x)
        if res is not None:
            x = resample_whole(state, res, x, temporal)
        if arch["variant"] == "2.2":
            x = x + (avg_down_explicit(x_in, temporal, cout) if res is not None else x_in)
    x = resblock_whole(state, "encoder.middle.0", x)
    x = attention(state, "encoder.middle.1", x)
    x = resblock_whole(state, "encoder.middle.2", x)
    x = F.silu(rms_norm(x, state["encoder.head.0.gamma"]))
    x = causal_conv_whole(state, "encoder.head.2", x)
    return vae_conv1(state, x, arch["z"])


# ------------------------------------------------------------------------------------------ (b) chunked

class FeatCache:
    """Per-layer streaming state of one encode, as the official feat_cache protocol keeps it."""

    def __init__(self):
        self.slots = {}

    def causal_conv(self, state, p, x):
        """A 3x3x3 causal conv on one chunk: the conv's remembered input frames (none, 1 or 2) go in front,
        zero frames fill up to 2; afterwards it remembers the last 2 frames of this chunk, or (previous last
        frame, this frame) when the chunk has 1 frame and something was remembered."""
        cache = self.slots.get(p)
        keep = x[:, :, -2:]
        if keep.shape[2] < 2 and cache is not None:
            keep = torch.cat([cache[:, :, -1:], keep], dim=2)
        if cache is not None:
            y = torch.cat([cache, x], dim=2)
            y = F.pad(y, (1, 1, 1, 1, 2 - cache.shape[2], 0))
        else:
            y = F.pad(x, (1, 1, 1, 1, 2, 0))
        self.slots[p] = keep
        return F.conv3d(y, state[p + ".weight"], state[p + ".bias"])

    def resblock(self, state, p, x):
        h = x
        if p + ".shortcut.weight" in state:
            h = F.conv3d(x, state[p + ".shortcut.weight"], state[p + ".shortcut.bias"])
        r = F.silu(rms_norm(x, state[p + ".residual.0.gamma"]))
        r = self.causal_conv(state, p + ".residual.2", r)
        r = F.silu(rms_norm(r, state[p + ".residual.3.gamma"]))
        r = self.causal_conv(state, p + ".residual.6", r)
        return r + h

    def resample(self, state, p, x, temporal):
        s = spatial_down(state, p, x)
        if not temporal:
            return s
        key = p + ".time_conv"
        prev = self.slots.get(key)
        if prev is None:  # first chunk: passed through unchanged, remembered
            self.slots[key] = s
            return s
        self.slots[key] = s[:, :, -1:]
        y = torch.cat([prev[:, :, -1:], s], dim=2)
        return F.conv3d(y, state[key + ".weight"], state[key + ".bias"], stride=(2, 1, 1))

    def encoder(self, state, arch, levels, x):
        x = self.causal_conv(state, "encoder.conv1", x)
        for level, (blocks, res, temporal, cout) in enumerate(levels):
            x_in = x
            for b in blocks:
                x = self.resblock(state, b, x)
            if res is not None:
                x = self.resample(state, res, x, temporal)
            if arch["variant"] == "2.2":
                if res is None:
                    x = x + avg_down_generic(x_in, 1, 1, cout)
                else:
                    x = x + avg_down_generic(x_in, 2 if temporal else 1, 2, cout)
        x = self.resblock(state, "encoder.middle.0", x)
        x = attention(state, "encoder.middle.1", x)
        x = self.resblock(state, "encoder.middle.2", x)
        x = F.silu(rms_norm(x, state["encoder.head.0.gamma"]))
        return self.causal_conv(state, "encoder.head.2", x)


def official_plan(t):
    """Frame 0 alone, then chunks of 4; trailing frames past 1 + 4*((t-1)//4) dropped."""
    return [1] + [4] * ((t - 1) // 4) if t >= 1 else []


def valid_plan(plan):
    """Whether a plan reproduces the official latents: frame 0 alone, then multiples of 4."""
    return bool(plan) and plan[0] == 1 and all(c > 0 and c % 4 == 0 for c in plan[1:])


def encode_chunked(state, x, plan=None):
    """Raw mean of float64 N x 3 x T x H x W fed as chunks of the given sizes (default official_plan(T));
    frames past sum(plan) are not fed.  Any plan is run as given, valid or not (see valid_plan)."""
    arch, x = prepare_input(state, x)
    t = x.shape[2]
    plan = official_plan(t) if plan is None else list(plan)
    if sum(plan) > t:
        raise ValueError("plan %s needs %d frames, clip has %d" % (plan, sum(plan), t))
    _, levels = level_plan(state)
    cache = FeatCache()
    outs = []
    pos = 0
    for size in plan:
        outs.append(cache.encoder(state, arch, levels, x[:, :, pos:pos + size]))
        pos += size
    return vae_conv1(state, torch.cat(outs, dim=2), arch["z"])


# ------------------------------------------------------------------------------------------ decoder
# Rules (a description of the official code: W21 = Wan-Video/Wan2.1 wan/modules/vae.py Decoder3d, Resample,
# WanVAE_.decode; W22 = Wan-Video/Wan2.2 wan/modules/vae2_2.py Decoder3d, Up_ResidualBlock, DupUp3D):
#   conv2 (1x1x1, z -> z) on the raw latents; conv1 causal 3x3x3; middle = ResidualBlock, AttentionBlock,
#   ResidualBlock; 4 up levels (wan_weights.decoder_levels); head = RMS norm, SiLU, causal conv -> 3 (12 for
#   2.2, then unpatchified); clamp(-1, 1).  Official decode: one latent per call with a shared feat cache.
#   upsample3d: time_conv (3,1,1) BEFORE the spatial step; its first chunk passes unchanged (slot 'Rep');
#   a later chunk after 'Rep' sees plain zero padding (frame 0 is not its history), else the 2 kept frames;
#   2C output channels per frame -> 2 frames (channels [0, C) first).  Spatial: nearest 2x + 3x3 conv.
#   W22 DupUp3D shortcut of the level input: repeat_interleave channels, (ft, fs, fs) depth-to-space, first
#   chunk drops its first ft - 1 frames.

def spatial_up(state, p, x):
    """upsample2d step: per frame nearest 2x (nearest-exact: each pixel becomes 2x2), 3x3 conv, padding 1."""
    n = x.shape[0]
    y = frames_fold(x).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    y = F.conv2d(y, state[p + ".resample.1.weight"], state[p + ".resample.1.bias"], padding=1)
    return frames_unfold(y, n)


def time_pairs(y):
    """N x 2C x T x h x w (time_conv output) -> N x C x 2T x h x w: frame 2t from channels [0, C), 2t + 1 from
    [C, 2C)."""
    n, c2, t, h, w = y.shape
    y = y.reshape(n, 2, c2 // 2, t, h, w)
    return torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(n, c2 // 2, 2 * t, h, w)


def dup_up(x, cout, ft, fs, first):
    """W22 DupUp3D: channel repeat then depth-to-space by (ft, fs, fs); first chunk drops ft - 1 frames."""
    n, cin, t, h, w = x.shape
    y = x.repeat_interleave(cout * ft * fs * fs // cin, dim=1)
    y = y.view(n, cout, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    y = y.reshape(n, cout, t * ft, h * fs, w * fs)
    return y[:, :, ft - 1:] if first else y


def unpatchify(x):
    """Inverse of patchify: "b (c r q) f h w -> b c f (h q) (w r)", channel c*4 + r*2 + q at (2y + q, 2x + r)."""
    n, c4, t, h, w = x.shape
    y = x.reshape(n, c4 // 4, 2, 2, t, h, w)               # n c col row t Y X
    y = y.permute(0, 1, 4, 5, 3, 6, 2)                      # n c t Y row X col
    return y.reshape(n, c4 // 4, t, 2 * h, 2 * w)


class _WholeClip:
    """Decoder layers over a whole clip at once (no state): every causal conv sees 2 zero frames in front;
    upsample3d passes frame 0 through and runs the time conv over frames 1.. with 2 zero frames in front."""

    causal_conv = staticmethod(causal_conv_whole)
    resblock = staticmethod(resblock_whole)

    @staticmethod
    def upsample(state, p, x, temporal):
        if temporal and x.shape[2] > 1:
            key = p + ".time_conv"
            rest = F.conv3d(F.pad(x[:, :, 1:], (0, 0, 0, 0, 2, 0)), state[key + ".weight"], state[key + ".bias"])
            x = torch.cat([x[:, :, :1], time_pairs(rest)], dim=2)
        return spatial_up(state, p, x)


def _decoder_body(ops, state, arch, x, first):
    """decoder.conv1 .. decoder.head on a chunk of latents (after conv2); ops: _WholeClip or a FeatCache."""
    x = ops.causal_conv(state, "decoder.conv1", x)
    x = ops.resblock(state, "decoder.middle.0", x)
    x = attention(state, "decoder.middle.1", x)
    x = ops.resblock(state, "decoder.middle.2", x)
    for lv in W.decoder_levels(arch["variant"], arch["dim"]):
        x_in = x
        for b in lv["blocks"]:
            x = ops.resblock(state, b, x)
        if lv["up"] is not None:
            x = ops.upsample(state, lv["up"], x, lv["temporal"])
        if lv["dup"]:
            x = x + dup_up(x_in, lv["cout"], 2 if lv["temporal"] else 1, 2, first)
    x = F.silu(rms_norm(x, state["decoder.head.0.gamma"]))
    return ops.causal_conv(state, "decoder.head.2", x)


def _decoder_stream_upsample(self, state, p, x, temporal):
    """FeatCache.upsample: the official upsample3d cache rule (see the section comment), then spatial_up."""
    if temporal:
        key = p + ".time_conv"
        prev = self.slots.get(key)
        if prev is None:                        # first chunk: passed through unchanged, slot marked 'Rep'
            self.slots[key] = "Rep"
        else:
            keep = x[:, :, -2:]
            if keep.shape[2] < 2:
                keep = torch.cat([torch.zeros_like(keep) if isinstance(prev, str) else prev[:, :, -1:], keep], dim=2)
            if isinstance(prev, str):           # after 'Rep': plain zero padding
                y = F.pad(x, (0, 0, 0, 0, 2, 0))
            else:
                y = torch.cat([prev, x], dim=2)
            self.slots[key] = keep
            x = time_pairs(F.conv3d(y, state[key + ".weight"], state[key + ".bias"]))
    return spatial_up(state, p, x)


FeatCache.upsample = _decoder_stream_upsample


def decoder_arch(state):
    return W.infer_decoder_arch(state)


def _decode_finish(arch, x):
    if arch["variant"] == "2.2":
        x = unpatchify(x)
    return x.clamp(-1.0, 1.0)


def decoded_frames(t):
    """Frames a clip of t latents decodes to: 1 + 4 (t - 1)."""
    return 1 + 4 * (t - 1) if t >= 1 else 0


def decode_whole_clip(state, z):
    """Float64 N x z x T x h x w RAW latents -> N x 3 x (1 + 4(T-1)) x H x W in [-1, 1], no chunking."""
    arch = decoder_arch(state)
    z = z.to(state["conv2.weight"].dtype)
    x = F.conv3d(z, state["conv2.weight"], state["conv2.bias"])
    return _decode_finish(arch, _decoder_body(_WholeClip, state, arch, x, first=True))


def decode_chunked(state, z, plan=None):
    """The official streaming decode: latents fed in calls of the given sizes (default: one per call, as
    WanVAE_.decode), one feat cache; the call holding latent 0 is the first chunk.  Any plan is run as given
    (only plans whose first call has 1 latent give the official frames)."""
    arch = decoder_arch(state)
    z = z.to(state["conv2.weight"].dtype)
    t = z.shape[2]
    plan = [1] * t if plan is None else list(plan)
    if sum(plan) != t:
        raise ValueError("plan %s covers %d latents, the clip has %d" % (plan, sum(plan), t))
    x = F.conv3d(z, state["conv2.weight"], state["conv2.bias"])
    cache = FeatCache()
    outs, pos = [], 0
    for i, size in enumerate(plan):
        outs.append(_decoder_body(cache, state, arch, x[:, :, pos:pos + size], first=(i == 0)))
        pos += size
    return _decode_finish(arch, torch.cat(outs, dim=2))


def decode_latents(state, latents, chunked=False, plan=None, images=False):
    """RAW latents T x z x h x w (one clip) -> pixels F x 3 x H x W float64 numpy, ComfyUI's
    clamp((x + 1) / 2, 0, 1); F = 1 + 4 (T - 1).  images=True: each latent decoded as its own clip (F = T)."""
    lat = torch.as_tensor(np.asarray(latents, dtype=np.float64))
    with torch.no_grad():
        if images:
            out = torch.cat([decode_whole_clip(state, lat[i:i + 1].permute(1, 0, 2, 3).unsqueeze(0))
                             for i in range(lat.shape[0])], dim=2)
        else:
            z = lat.permute(1, 0, 2, 3).unsqueeze(0)
            out = decode_chunked(state, z, plan) if chunked else decode_whole_clip(state, z)
    return ((out[0].permute(1, 0, 2, 3) + 1.0) / 2.0).clamp(0.0, 1.0).numpy()


# ------------------------------------------------------------------------------------------ pixels in, latents out

def crop_frames(frames_u8, variant):
    """ComfyUI's centre crop: keep floor(d/m)*m starting at (d mod m)//2, m = 8 (2.1) or 16 (2.2)."""
    return V.crop_frames(np.asarray(frames_u8), SPATIAL[variant])


def frames_to_input(frames_u8, variant):
    """uint8 N x H x W x 3 -> cropped, p/255*2-1, float64 1 x 3 x N x H x W (the N frames are one clip)."""
    f = crop_frames(frames_u8, variant)
    x = torch.from_numpy(np.ascontiguousarray(f)).to(torch.float64) / 255.0 * 2.0 - 1.0
    return x.permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def latent_shape(variant, n, height, width, z):
    m = SPATIAL[variant]
    return (1 + (n - 1) // 4, z, height // m, width // m)


def encode_frames(state, frames_u8, chunked=False, plan=None):
    """uint8 N x H x W x 3 (one clip) -> raw mean T_lat x z x h x w, float64 numpy."""
    variant = W.infer_arch(state)["variant"]
    x = frames_to_input(frames_u8, variant)
    with torch.no_grad():
        out = encode_chunked(state, x, plan) if chunked else encode_whole_clip(state, x)
    return out[0].permute(1, 0, 2, 3).numpy()


def normalise(latents, variant, channel_axis=1):
    """(mean - mu_c) / sigma_c with the variant's table (z must be 16 for 2.1, 48 for 2.2)."""
    mu, sigma = NORMALISATION[variant]
    lat = np.asarray(latents, dtype=np.float64)
    if lat.shape[channel_axis] != len(mu):
        raise ValueError("normalising Wan %s needs %d channels, got %d" % (variant, len(mu), lat.shape[channel_axis]))
    shape = [1] * lat.ndim
    shape[channel_axis] = len(mu)
    return (lat - np.reshape(mu, shape)) / np.reshape(sigma, shape)


def denormalise(latents, variant, channel_axis=1):
    mu, sigma = NORMALISATION[variant]
    lat = np.asarray(latents, dtype=np.float64)
    shape = [1] * lat.ndim
    shape[channel_axis] = len(mu)
    return lat * np.reshape(sigma, shape) + np.reshape(mu, shape)


# ------------------------------------------------------------------------------------------ self-test

def smooth_clip(n, h, w, seed):
    """Smooth moving colour fields plus a little noise in [-1, 1], float64 1 x 3 x n x h x w."""
    g = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    out = np.zeros((3, n, h, w))
    for c in range(3):
        params = g.uniform(0.5, 3.0, size=(3, 4)), g.uniform(0, 2 * np.pi, size=(2, 4)), g.uniform(0.1, 0.4, size=4)
        for t in range(n):
            f = np.zeros((h, w))
            for i in range(4):
                f += params[2][i] * np.sin(2 * np.pi * params[0][0, i] * xx + params[1][0, i] + 0.3 * t * params[0][2, i]) \
                    * np.cos(2 * np.pi * params[0][1, i] * yy + params[1][1, i])
            out[c, t] = f
    out += g.normal(0, 0.05, size=out.shape)
    return torch.from_numpy(np.clip(out, -1, 1)).unsqueeze(0)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def self_test(verbose=True):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    failures = []
    t_start = time.monotonic()

    def check(ok, msg):
        print(("ok   " if ok else "FAIL ") + msg)
        if not ok:
            failures.append(msg)

    # Pieces against each other: the two AvgDown3D forms, and patchify's channel order.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 4, 6, generator=g, dtype=torch.float64)
    check(torch.equal(avg_down_explicit(x, True, 6), avg_down_generic(x, 2, 2, 6))
          and torch.equal(avg_down_explicit(x, False, 3), avg_down_generic(x, 1, 2, 3)),
          "AvgDown3D: the note's per-level statement == the generic space-to-depth + group mean")
    p = patchify(x)
    ok = all(torch.equal(p[:, c * 4 + col * 2 + row], x[:, c, :, row::2, col::2])
             for c in range(3) for row in range(2) for col in range(2))
    check(ok, "patchify: channel c*4 + col*2 + row holds pixels (2y + row, 2x + col)")

    with torch.no_grad():
        for variant, dim, z, h, w in (("2.1", 8, 4, 16, 24), ("2.2", 8, 6, 32, 48)):
            state = W.make_state(variant, dim, z, seed=11)
            clip = smooth_clip(17, h, w, seed=12)
            t0 = time.monotonic()
            whole = encode_whole_clip(state, clip)
            tag = "Wan %s dim %d z %d %dx%d" % (variant, dim, z, w, h)
            check(tuple(whole.shape) == (1, z, 5, h // SPATIAL[variant], w // SPATIAL[variant]),
                  "%s: whole-clip latent shape %s for 17 frames" % (tag, tuple(whole.shape)))
            mag = float(whole.abs().max())
            std = float(whole.std())
            check(0.05 < std and mag < 100, "%s: latents O(1): std %.3f, max |.| %.3f (%.2f s)"
                  % (tag, std, mag, time.monotonic() - t0))
            for plan in ([1, 4, 4, 4, 4], [1, 8, 8], [1, 12, 4], [1, 16], [1, 4, 8, 4]):
                ch = encode_chunked(state, clip, plan)
                d = _rel(ch, whole) if ch.shape == whole.shape else float("inf")
                check(d <= 1e-12, "%s: chunked plan %s == whole clip: rel %.2e (max |diff| %.2e)"
                      % (tag, plan, d, float((ch - whole).abs().max()) if d < 1 else d))
            # Prefix stability and dropped trailing frames.
            for t in (13, 9, 5, 1):
                pre = encode_whole_clip(state, clip[:, :, :t])
                n = 1 + (t - 1) // 4
                d = _rel(pre, whole[:, :, :n])
                check(d <= 1e-12, "%s: first %d frames give the first %d latents: rel %.2e" % (tag, t, n, d))
            five = encode_chunked(state, clip[:, :, :5])
            for t in (6, 7, 8):
                other = encode_chunked(state, clip[:, :, :t])
                check(other.shape == five.shape and torch.equal(other, five),
                      "%s: T=%d gives the latents of T=5 (%d latents)" % (tag, t, other.shape[2]))
            # A batch of 2 clips equals each alone.
            clip2 = smooth_clip(5, h, w, seed=13)
            both = encode_chunked(state, torch.cat([clip[:, :, :5], clip2], dim=0))
            d = max(_rel(both[:1], whole[:, :, :2]), _rel(both[1:], encode_whole_clip(state, clip2)))
            check(d <= 1e-12, "%s: a batch of 2 clips == each alone: rel %.2e" % (tag, d))
            # Plans the note calls wrong must differ (or fail).
            for plan in ([5, 4, 4], [1, 2, 2, 4, 4], [1, 6, 6], [1, 11, 4]):
                sub = clip[:, :, :sum(plan)]
                ref = encode_whole_clip(state, sub)
                try:
                    bad = encode_chunked(state, sub, plan)
                    if bad.shape != ref.shape:
                        check(True, "%s: wrong plan %s differs: %d latents instead of %d"
                              % (tag, plan, bad.shape[2], ref.shape[2]))
                    else:
                        d = _rel(bad, ref)
                        check(d > 1e-3, "%s: wrong plan %s differs: rel %.2e" % (tag, plan, d))
                except RuntimeError as e:
                    check(True, "%s: wrong plan %s fails: %s" % (tag, plan, str(e).splitlines()[0][:80]))
            check(not valid_plan([5, 4]) and not valid_plan([1, 6]) and valid_plan([1, 8, 4]),
                  "valid_plan: 1 then multiples of 4 only")

        # Pixels in: crop, map, shape (odd sizes).
        state = W.make_state("2.2", 4, 4, seed=3)
        frames = np.random.default_rng(4).integers(0, 256, size=(6, 37, 45, 3), dtype=np.uint8)
        lat = encode_frames(state, frames)
        check(lat.shape == latent_shape("2.2", 6, 37, 45, 4) == (2, 4, 2, 2),
              "encode_frames: 6 frames of 45x37 (Wan 2.2) -> %s" % (lat.shape,))
        inp = frames_to_input(frames, "2.1")
        check(tuple(inp.shape) == (1, 3, 6, 32, 40) and float(inp[0, 0, 0, 0, 0]) == frames[0, 2, 2, 0] / 255 * 2 - 1,
              "frames_to_input: 45x37 -> 40x32 from offset (2, 2), p/255*2-1")
        r = np.random.default_rng(1).normal(size=(2, 16, 3, 3))
        check(np.allclose(denormalise(normalise(r, "2.1"), "2.1"), r) and len(WAN22_MEAN) == len(WAN22_STD) == 48,
              "normalise / denormalise round trip; Wan 2.2 table has 48 + 48 values")

    # Decoder: multi-latent calls are exact, frame counts, causality, images.
    x = torch.randn(2, 12, 3, 4, 5, generator=g, dtype=torch.float64)
    check(torch.equal(patchify(unpatchify(x)), x), "unpatchify inverts patchify (channel c*4 + col*2 + row)")
    y = torch.randn(1, 6, 2, 3, 4, generator=g, dtype=torch.float64)
    tp = time_pairs(y)
    check(torch.equal(tp[:, :, 0::2], y[:, :3]) and torch.equal(tp[:, :, 1::2], y[:, 3:]),
          "time_conv pairs: frame 2t from channels [0, C), frame 2t + 1 from [C, 2C)")
    with torch.no_grad():
        for variant, z, h, w in (("2.1", 16, 3, 5), ("2.2", 48, 3, 5)):
            state = W.make_state(variant, 8, z, seed=21, decoder_dim=8)
            m = SPATIAL[variant]
            tag = "Wan %s decoder dim 8 z %d, %dx%d latents" % (variant, z, w, h)
            norm = torch.randn(1, z, 5, h, w, generator=g, dtype=torch.float64)
            lat = torch.as_tensor(denormalise(norm.numpy(), variant))
            t0 = time.monotonic()
            official = decode_chunked(state, lat)  # one latent per call, as WanVAE_.decode
            dt = time.monotonic() - t0
            check(tuple(official.shape) == (1, 3, 17, h * m, w * m),
                  "%s: 5 latents -> %s (1 + 4*4 frames of %dx%d) (%.2f s)"
                  % (tag, tuple(official.shape), w * m, h * m, dt))
            unsat = float(((official > -1) & (official < 1)).double().mean())
            check(unsat > 0.5, "%s: %.1f %% of the outputs inside (-1, 1), std %.3f"
                  % (tag, 100 * unsat, float(official.std())))
            for plan in ([1, 4], [1, 2, 2], [1, 1, 3], "whole"):
                other = decode_whole_clip(state, lat) if plan == "whole" else decode_chunked(state, lat, plan)
                d = float((other - official).abs().max())
                check(other.shape == official.shape and d <= 1e-12,
                      "%s: %s == one latent per call: max |diff| %.2e"
                      % (tag, "whole clip" if plan == "whole" else "plan %s" % plan, d))
            for t in (1, 2, 3):
                pre = decode_chunked(state, lat[:, :, :t])
                n = decoded_frames(t)
                d = float((pre - official[:, :, :n]).abs().max()) if pre.shape[2] == n else float("inf")
                check(pre.shape[2] == n and d <= 1e-12, "%s: first %d latent(s) -> the first %d frames: max |diff| %.2e"
                      % (tag, t, n, d))
            try:
                bad = decode_chunked(state, lat, [2, 3])
                check(bad.shape[2] != official.shape[2], "%s: wrong plan [2, 3] gives %d frames, not %d"
                      % (tag, bad.shape[2], official.shape[2]))
            except RuntimeError as e:
                check(True, "%s: wrong plan [2, 3] fails: %s" % (tag, str(e).splitlines()[0][:80]))
            imgs = decode_latents(state, lat[0].permute(1, 0, 2, 3).numpy()[:3], images=True)
            alone = np.concatenate([decode_latents(state, lat[0, :, i:i + 1].permute(1, 0, 2, 3).numpy())
                                    for i in range(3)])
            first = decode_latents(state, lat[0].permute(1, 0, 2, 3).numpy()[:1])
            check(imgs.shape == (3, 3, h * m, w * m) and np.array_equal(imgs, alone)
                  and np.abs(imgs[0] - first[0]).max() == 0.0,
                  "%s: images=True decodes each latent alone (3 latents -> 3 frames)" % tag)

    print("%s: %d failure(s) (%.1f s)" % ("self-test passed" if not failures else "self-test FAILED", len(failures),
                                          time.monotonic() - t_start))
    return not failures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--model", help="encode frames with this checkpoint (any layout)")
    ap.add_argument("--frames", help="raw RGB24 frames file")
    ap.add_argument("--n", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--normalise", action="store_true", help="(mean - mu) / sigma instead of the raw mean")
    ap.add_argument("--latents", help="decode instead: float32 T x z x h x w .npy (one clip; raw unless "
                                      "--latent-format wan21|wan22)")
    ap.add_argument("--latent-format", choices=("raw", "wan21", "wan22"), default="raw")
    ap.add_argument("--images", action="store_true", help="decode each latent as its own clip")
    ap.add_argument("--out", help="float32 T_lat x z x h x w (encode) or F x 3 x H x W in [0, 1] (decode)")
    a = ap.parse_args(argv)
    if a.self_test:
        return 0 if self_test() else 1
    if a.model and a.latents and a.out:
        state, info = W.load_wan_state(a.model, decoder=True)
        lat = np.load(a.latents).astype(np.float64)
        if a.latent_format != "raw":
            lat = denormalise(lat, {"wan21": "2.1", "wan22": "2.2"}[a.latent_format])
        px = decode_latents(state, lat, images=a.images)
        px.astype("<f4").tofile(a.out)
        print("wrote %s: %s pixels of Wan %s" % (a.out, "x".join(map(str, px.shape)), info["variant"]))
        return 0
    if not (a.model and a.frames and a.n and a.width and a.height and a.out):
        ap.print_usage(sys.stderr)
        return 2
    state, info = W.load_wan_state(a.model)
    frames = np.fromfile(a.frames, dtype=np.uint8, count=a.n * a.height * a.width * 3)
    lat = encode_frames(state, frames.reshape(a.n, a.height, a.width, 3))
    if a.normalise:
        lat = normalise(lat, info["variant"])
    lat.astype("<f4").tofile(a.out)
    print("wrote %s: %s latents of Wan %s" % (a.out, "x".join(map(str, lat.shape)), info["variant"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
