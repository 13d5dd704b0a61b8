#!/usr/bin/python3
"""Random Wan 2.1 / Wan 2.2 causal-video-VAE *encoder* checkpoints in every real key layout.

Written from shared/notes/video-vae-semantics.md (architecture and "Checkpoint layouts"); no upstream code.
Importable module and CLI:

  python3 tests/python/wan_weights.py --variant 2.1|2.2 [--dim D] [--z Z] [--in-channels 3]
          [--layout official|comfy|diffusers] [--dtype F32|F16|BF16] [--seed S] [--with-decoder-stub]
          --out FILE.safetensors

Defaults: variant 2.1, dim 8, z 16 (2.1) / 48 (2.2), in-channels 3, layout official, dtype F32, seed 0.

Functions
---------
canonical_shapes(variant, dim, z, in_channels)  ordered {official unprefixed name: shape} of the encoder + conv1
make_state(...)                                  random float64 tensors of those shapes
layout_name(canon, variant, layout)              canonical name -> stored name in a layout
write_checkpoint(path, state, variant, layout, dtype, decoder_stub)  writes; returns the state as stored
                                                 (rounded to dtype, float64, canonical names)
make_checkpoint(path, ...)                       make_state + write_checkpoint
load_wan_state(path)                             (canonical float64 state, info) from any layout; decoder and
                                                 other tensors are ignored
infer_arch(state)                                {variant, dim, z, in_channels, widths} from canonical shapes

Architecture (per the note).  Level widths are [dim, 2dim, 4dim, 4dim] for both variants (real: dim 96 for
2.1, 160 for 2.2).  Level L takes w_{L-1} channels (w_{-1} = dim) to w_L with 2 ResidualBlocks; levels 0..2
end with a Resample (level 0 downsample2d, levels 1, 2 downsample3d); level 3 has none.  The first
ResidualBlock of a level has a 1x1x1 ``shortcut`` iff its in != out (levels 1 and 2).  conv1 takes
in_channels (2.1) or in_channels*4 (2.2, after the 2x2 patchify) to dim.  The head ends in 2z channels and the
VAE-level ``conv1`` is 1x1x1, 2z -> 2z.

Key names (canonical = official, unprefixed; gammas [C,1,1,1] unless noted, 3-D conv weights [out,in,3,3,3])

  encoder.conv1.{weight,bias}
  <block>.residual.0.gamma, <block>.residual.2.{weight,bias}, <block>.residual.3.gamma,
  <block>.residual.6.{weight,bias}, [<block>.shortcut.{weight,bias} [out,in,1,1,1]]
  <resample>.resample.1.{weight,bias} [C,C,3,3]; <resample>.time_conv.{weight,bias} [C,C,3,1,1] (3-D only)
  encoder.middle.0.residual.* / encoder.middle.2.residual.*  (ResidualBlocks w3 -> w3)
  encoder.middle.1.norm.gamma [C,1,1], encoder.middle.1.to_qkv.{weight,bias} [3C,C,1,1],
  encoder.middle.1.proj.{weight,bias} [C,C,1,1]
  encoder.head.0.gamma [C,1,1,1], encoder.head.2.{weight,bias} [2z,C,3,3,3]
  conv1.{weight,bias} [2z,2z,1,1,1]

  Wan 2.1 official (flat ``downsamples`` list, 11 entries):
    level L block j (j = 0, 1) -> encoder.downsamples.{3L+j}   (level 3: indices 9, 10)
    level L resample           -> encoder.downsamples.{3L+2}   (2: downsample2d; 5, 8: downsample3d)
  Wan 2.2 official (``downsamples`` holds 4 Down_ResidualBlocks, each an inner ``downsamples`` list of
    2 ResidualBlocks then the Resample; the AvgDown3D shortcut ``avg_shortcut`` has no parameters):
    level L block j -> encoder.downsamples.{L}.downsamples.{j}
    level L resample -> encoder.downsamples.{L}.downsamples.2      (levels 0..2; level 3 has none)
    so e.g. encoder.downsamples.1.downsamples.0.shortcut.weight, encoder.downsamples.0.downsamples.2.resample.1.weight,
    encoder.downsamples.2.downsamples.2.time_conv.weight.
    Why: the note says each Wan 2.2 level is a Down_ResidualBlock of 2 ResidualBlocks (+ Resample) and that
    the nested names are ``downsamples.{i}.downsamples.{j}``; the Resample follows the 2 blocks in the same
    list (index 2), and the family signal ``decoder.upsamples.0.upsamples.0.residual.2.weight`` has the
    same shape of nesting.

  comfy: the official names under the prefix ``vae.`` (as in all-in-one ComfyUI checkpoints).

  diffusers: encoder.conv1 -> encoder.conv_in, encoder.head.0 -> encoder.norm_out, encoder.head.2 ->
    encoder.conv_out, conv1 -> quant_conv; in ResidualBlocks residual.0 -> norm1, residual.2 -> conv1,
    residual.3 -> norm2, residual.6 -> conv2, shortcut -> conv_shortcut; encoder.middle.0/2 ->
    encoder.mid_block.resnets.0/1, encoder.middle.1 -> encoder.mid_block.attentions.0 (norm, to_qkv, proj kept).
    Wan 2.1: encoder.downsamples.{i} -> encoder.down_blocks.{i} (flat index kept; resample.1 / time_conv kept).
    Wan 2.2: encoder.downsamples.{L}.downsamples.{j} -> encoder.down_blocks.{L}.resnets.{j} (j = 0, 1) and
    encoder.downsamples.{L}.downsamples.2 -> encoder.down_blocks.{L}.downsampler (.resample.1, .time_conv).

--with-decoder-stub adds tensors an encoder loader must ignore: official/comfy ``conv2.*`` [z,z,1,1,1],
``decoder.conv1.weight``, ``decoder.middle.0.residual.0.gamma`` (and for 2.2
``decoder.upsamples.0.upsamples.0.residual.2.weight``); diffusers ``post_quant_conv.*``,
``decoder.conv_in.weight``, ``decoder.mid_block.resnets.0.norm1.gamma``,
``decoder.up_blocks.0.resnets.0.conv1.weight`` (else ``decoder.upsamples.0.residual.2.weight`` for official 2.1).

Weight scales keep activations O(1): conv weights N(0, 1/fan_in), biases N(0, 0.1^2), gammas 1 + 0.1 N(0,1).

Run with /usr/bin/python3.
"""

import argparse
import math
import os
import re
import sys
from collections import OrderedDict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vae_reference as V  # noqa: E402  (safetensors I/O only)

VARIANTS = ("2.1", "2.2")
LAYOUTS = ("official", "comfy", "diffusers")
DTYPES = ("F32", "F16", "BF16")
DEFAULT_Z = {"2.1": 16, "2.2": 48}
DIM_MULT = (1, 2, 4, 4)
TEMPORAL = (False, True, True)  # levels 0..2: downsample2d, downsample3d, downsample3d


def widths(dim):
    return [dim * m for m in DIM_MULT]


def block_prefix(variant, level, j):
    """Official prefix of ResidualBlock j (0, 1) of a level."""
    if variant == "2.1":
        return "encoder.downsamples.%d" % (3 * level + j)
    return "encoder.downsamples.%d.downsamples.%d" % (level, j)


def resample_prefix(variant, level):
    """Official prefix of the Resample closing a level (0..2)."""
    if variant == "2.1":
        return "encoder.downsamples.%d" % (3 * level + 2)
    return "encoder.downsamples.%d.downsamples.2" % level


def canonical_shapes(variant="2.1", dim=8, z=None, in_channels=3):
    """Ordered {canonical name: shape} of the encoder and the VAE-level conv1."""
    if variant not in VARIANTS:
        raise ValueError("variant must be one of %s" % (VARIANTS,))
    z = DEFAULT_Z[variant] if z is None else z
    cin = in_channels * (4 if variant == "2.2" else 1)
    s = OrderedDict()

    def conv3(name, cout, cin_):
        s[name + ".weight"] = (cout, cin_, 3, 3, 3)
        s[name + ".bias"] = (cout,)

    def resblock(p, a, b):
        s[p + ".residual.0.gamma"] = (a, 1, 1, 1)
        conv3(p + ".residual.2", b, a)
        s[p + ".residual.3.gamma"] = (b, 1, 1, 1)
        conv3(p + ".residual.6", b, b)
        if a != b:
            s[p + ".shortcut.weight"] = (b, a, 1, 1, 1)
            s[p + ".shortcut.bias"] = (b,)

    conv3("encoder.conv1", dim, cin)
    w = widths(dim)
    prev = dim
    for level in range(4):
        resblock(block_prefix(variant, level, 0), prev, w[level])
        resblock(block_prefix(variant, level, 1), w[level], w[level])
        prev = w[level]
        if level < 3:
            p = resample_prefix(variant, level)
            s[p + ".resample.1.weight"] = (prev, prev, 3, 3)
            s[p + ".resample.1.bias"] = (prev,)
            if TEMPORAL[level]:
                s[p + ".time_conv.weight"] = (prev, prev, 3, 1, 1)
                s[p + ".time_conv.bias"] = (prev,)
    c = w[3]
    resblock("encoder.middle.0", c, c)
    s["encoder.middle.1.norm.gamma"] = (c, 1, 1)
    s["encoder.middle.1.to_qkv.weight"] = (3 * c, c, 1, 1)
    s["encoder.middle.1.to_qkv.bias"] = (3 * c,)
    s["encoder.middle.1.proj.weight"] = (c, c, 1, 1)
    s["encoder.middle.1.proj.bias"] = (c,)
    resblock("encoder.middle.2", c, c)
    s["encoder.head.0.gamma"] = (c, 1, 1, 1)
    conv3("encoder.head.2", 2 * z, c)
    s["conv1.weight"] = (2 * z, 2 * z, 1, 1, 1)
    s["conv1.bias"] = (2 * z,)
    return s


def make_state(variant="2.1", dim=8, z=None, in_channels=3, seed=0):
    """Random float64 weights with O(1) activations (see the module docstring)."""
    gen = torch.Generator().manual_seed(int(seed))
    state = OrderedDict()
    for name, shape in canonical_shapes(variant, dim, z, in_channels).items():
        r = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name.endswith(".gamma"):
            t = 1.0 + 0.1 * r
        elif name.endswith(".bias"):
            t = 0.1 * r
        else:
            fan_in = int(math.prod(shape[1:]))
            t = r / math.sqrt(fan_in)
        state[name] = t
    return state


# ------------------------------------------------------------------------------------------ layouts

_RES_DIFFUSERS = [(".residual.0.", ".norm1."), (".residual.2.", ".conv1."), (".residual.3.", ".norm2."),
                  (".residual.6.", ".conv2."), (".shortcut.", ".conv_shortcut.")]


def _diffusers_name(canon, variant):
    n = canon
    if n.startswith("conv1."):
        return "quant_conv." + n[len("conv1."):]
    if n.startswith("encoder.conv1."):
        return "encoder.conv_in." + n[len("encoder.conv1."):]
    if n.startswith("encoder.head.0."):
        return "encoder.norm_out." + n[len("encoder.head.0."):]
    if n.startswith("encoder.head.2."):
        return "encoder.conv_out." + n[len("encoder.head.2."):]
    n = re.sub(r"^encoder\.middle\.0\.", "encoder.mid_block.resnets.0.", n)
    n = re.sub(r"^encoder\.middle\.2\.", "encoder.mid_block.resnets.1.", n)
    n = re.sub(r"^encoder\.middle\.1\.", "encoder.mid_block.attentions.0.", n)
    if variant == "2.1":
        n = re.sub(r"^encoder\.downsamples\.(\d+)\.", r"encoder.down_blocks.\1.", n)
    else:
        m = re.match(r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(.*)$", n)
        if m:
            level, j, rest = m.groups()
            if rest.startswith("resample.") or rest.startswith("time_conv."):
                n = "encoder.down_blocks.%s.downsampler.%s" % (level, rest)
            else:
                n = "encoder.down_blocks.%s.resnets.%s.%s" % (level, j, rest)
    for a, b in _RES_DIFFUSERS:
        n = n.replace(a, b)
    return n


def layout_name(canon, variant, layout):
    if layout == "official":
        return canon
    if layout == "comfy":
        return "vae." + canon
    if layout == "diffusers":
        return _diffusers_name(canon, variant)
    raise ValueError("layout must be one of %s" % (LAYOUTS,))


def decoder_stub(variant, layout, z, dim, seed=0):
    """A few decoder tensors (stored names) that an encoder loader must ignore."""
    gen = torch.Generator().manual_seed(int(seed) + 7919)

    def r(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1

    if layout == "diffusers":
        t = {"post_quant_conv.weight": r(z, z, 1, 1, 1), "post_quant_conv.bias": r(z),
             "decoder.conv_in.weight": r(4 * dim, z, 3, 3, 3),
             "decoder.mid_block.resnets.0.norm1.gamma": 1 + r(4 * dim, 1, 1, 1),
             "decoder.up_blocks.0.resnets.0.conv1.weight": r(4 * dim, 4 * dim, 3, 3, 3)}
    else:
        t = {"conv2.weight": r(z, z, 1, 1, 1), "conv2.bias": r(z),
             "decoder.conv1.weight": r(4 * dim, z, 3, 3, 3),
             "decoder.middle.0.residual.0.gamma": 1 + r(4 * dim, 1, 1, 1)}
        if variant == "2.2":
            t["decoder.upsamples.0.upsamples.0.residual.2.weight"] = r(4 * dim, 4 * dim, 3, 3, 3)
        else:
            t["decoder.upsamples.0.residual.2.weight"] = r(4 * dim, 4 * dim, 3, 3, 3)
        if layout == "comfy":
            t = {"vae." + k: v for k, v in t.items()}
    return t


def write_checkpoint(path, state, variant, layout="official", dtype="F32", with_decoder_stub=False, seed=0,
                     metadata=None):
    """Writes the canonical state in a layout and dtype; returns the stored values (float64, canonical names)."""
    if dtype not in DTYPES:
        raise ValueError("dtype must be one of %s" % (DTYPES,))
    stored = OrderedDict((k, V.round_to_dtype(v, dtype)) for k, v in state.items())
    out = {layout_name(k, variant, layout): v for k, v in stored.items()}
    if len(out) != len(stored):
        raise AssertionError("layout %s maps two names to one" % layout)
    if with_decoder_stub:
        arch = infer_arch(stored)
        out.update(decoder_stub(variant, layout, arch["z"], arch["dim"], seed))
    V.write_safetensors(path, out, dtype=dtype, metadata=metadata)
    return stored


def make_checkpoint(path, variant="2.1", dim=8, z=None, in_channels=3, layout="official", dtype="F32", seed=0,
                    with_decoder_stub=False):
    state = make_state(variant, dim, z, in_channels, seed)
    return write_checkpoint(path, state, variant, layout, dtype, with_decoder_stub, seed)


# ------------------------------------------------------------------------------------------ loading

def infer_arch(state):
    """{variant, dim, z, in_channels, widths} from canonical names and shapes."""
    w = state["encoder.conv1.weight"]
    variant = "2.2" if any(k.startswith("encoder.downsamples.0.downsamples.") for k in state) else "2.1"
    dim = int(w.shape[0])
    cin = int(w.shape[1])
    z = int(state["conv1.weight"].shape[0]) // 2
    if variant == "2.2":
        if cin % 4:
            raise ValueError("Wan 2.2 conv1 has %d input channels, not a multiple of 4" % cin)
        cin //= 4
    return {"variant": variant, "dim": dim, "z": z, "in_channels": cin, "widths": widths(dim)}


def load_wan_state(path):
    """(canonical float64 state, info) of a Wan encoder checkpoint in any layout; info has variant, dim, z,
    in_channels, layout.  Decoder tensors and anything not in the encoder are ignored."""
    tensors, _ = V.read_safetensors(path)
    if any(k.startswith("vae.encoder.") for k in tensors):
        layout = "comfy"
    elif "encoder.conv_in.weight" in tensors:
        layout = "diffusers"
    elif "encoder.conv1.weight" in tensors:
        layout = "official"
    else:
        raise ValueError("%s: not a Wan VAE checkpoint (no encoder.conv1 / conv_in)" % path)
    if layout == "diffusers":
        variant = "2.2" if any(k.startswith("encoder.down_blocks.0.resnets.") for k in tensors) else "2.1"
        conv_in, quant = tensors["encoder.conv_in.weight"], tensors["quant_conv.weight"]
    else:
        p = "vae." if layout == "comfy" else ""
        variant = "2.2" if any(k.startswith(p + "encoder.downsamples.0.downsamples.") for k in tensors) else "2.1"
        conv_in, quant = tensors[p + "encoder.conv1.weight"], tensors[p + "conv1.weight"]
    dim = int(conv_in.shape[0])
    cin = int(conv_in.shape[1]) // (4 if variant == "2.2" else 1)
    z = int(quant.shape[0]) // 2
    state = OrderedDict()
    for canon, shape in canonical_shapes(variant, dim, z, cin).items():
        stored = layout_name(canon, variant, layout)
        if stored not in tensors:
            raise KeyError("%s: tensor %s (%s) missing" % (path, stored, canon))
        t = tensors[stored]
        if tuple(t.shape) != tuple(shape):
            raise ValueError("%s: %s has shape %s, expected %s" % (path, stored, tuple(t.shape), shape))
        state[canon] = t
    info = {"variant": variant, "dim": dim, "z": z, "in_channels": cin, "layout": layout}
    return state, info


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a random Wan 2.1/2.2 VAE encoder checkpoint (.safetensors).")
    ap.add_argument("--variant", choices=VARIANTS, default="2.1")
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--z", type=int, default=None, help="latent channels (default 16 for 2.1, 48 for 2.2)")
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--layout", choices=LAYOUTS, default="official")
    ap.add_argument("--dtype", choices=DTYPES, default="F32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-decoder-stub", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    stored = make_checkpoint(a.out, a.variant, a.dim, a.z, a.in_channels, a.layout, a.dtype, a.seed,
                             a.with_decoder_stub)
    arch = infer_arch(stored)
    print("wrote %s: Wan %s encoder, dim %d, z %d, %d encoder tensors, layout %s, %s%s"
          % (a.out, a.variant, arch["dim"], arch["z"], len(stored), a.layout, a.dtype,
             ", with decoder stub" if a.with_decoder_stub else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
