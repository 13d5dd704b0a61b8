#!/usr/bin/env python3
"""Random Wan 2.1 / Wan 2.2 causal-video-VAE checkpoints (encoder, optionally the decoder) in every real
key layout.

Written from shared/notes/video-vae-semantics.md (architecture and "Checkpoint layouts") and, for the
decoder, from a description of the official code (Wan-Video/Wan2.1 wan/modules/vae.py ``Decoder3d``,
Wan-Video/Wan2.2 wan/modules/vae2_2.py ``Decoder3d`` / ``Up_ResidualBlock``) and of diffusers'
AutoencoderKLWan key names; no upstream code.  Importable module and CLI:

  python3 tests/python/wan_weights.py --variant 2.1|2.2 [--dim D] [--z Z] [--in-channels 3]
          [--layout official|comfy|diffusers] [--dtype F32|F16|BF16] [--seed S]
          [--with-decoder [--decoder-dim DD] | --with-decoder-stub] --out FILE.safetensors

Defaults: variant 2.1, dim 8, z 16 (2.1) / 48 (2.2), in-channels 3, layout official, dtype F32, seed 0.

Functions
---------
canonical_shapes(variant, dim, z, in_channels, decoder_dim=None)
                                                 ordered {official unprefixed name: shape} of the encoder + conv1
                                                 (+ the decoder and conv2 when decoder_dim is given)
decoder_shapes(variant, dim, z, out_channels)    the decoder + conv2 alone
make_state(..., decoder_dim=None)                random float64 tensors of those shapes
layout_name(canon, variant, layout)              canonical name -> stored name in a layout
write_checkpoint(path, state, variant, layout, dtype, decoder_stub)  writes; returns the state as stored
                                                 (rounded to dtype, float64, canonical names)
make_checkpoint(path, ...)                       make_state + write_checkpoint
load_wan_state(path, decoder=False)              (canonical float64 state, info) from any layout; decoder and
                                                 other tensors are ignored unless decoder=True
infer_arch(state)                                {variant, dim, z, in_channels, widths} from canonical shapes
decoder_levels(variant, dim)                     the decoder's 4 up levels (prefixes, widths, temporal flags)
infer_decoder_arch(state)                        {variant, dim, z, out_channels} of a canonical decoder

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

Decoder (--with-decoder; official names; W21 = Wan2.1 vae.py, W22 = Wan2.2 vae2_2.py).  dims =
[4d, 4d, 4d, 2d, d] for decoder width d (real: 96 for 2.1, 256 for 2.2 -- Wan 2.2's decoder is wider than its
encoder, 160, hence the separate --decoder-dim); temporal upsampling after levels 0 and 1 (W21/W22
``temperal_upsample = [True, True, False]``).

  decoder.conv1 [4d, z, 3, 3, 3]; decoder.middle.{0,1,2} as in the encoder (width 4d);
  decoder.head.0.gamma [d,1,1,1], decoder.head.2 [3 (2.1) | 12 (2.2, unpatchified later), d, 3, 3, 3];
  conv2 [z, z, 1, 1, 1].
  Wan 2.1 (flat ``upsamples`` list, 15 entries): level i (0..3) takes in_i = dims[i] (halved for i = 1, 2, 3:
    the preceding Resample halves channels) to out_i = dims[i+1] with ResidualBlocks decoder.upsamples.{4i+j}
    (j = 0, 1, 2: in->out, out->out, out->out); levels 0..2 end with the Resample decoder.upsamples.{4i+3}:
    resample.1 [out/2, out, 3, 3] (nearest 2x then 3x3 conv), and for levels 0, 1 time_conv [2 out, out, 3, 1, 1].
  Wan 2.2 (``upsamples`` of 4 Up_ResidualBlocks): level i takes dims[i] -> dims[i+1] (no halving) with
    ResidualBlocks decoder.upsamples.{i}.upsamples.{j} (j = 0, 1, 2) and, for i < 3, the Resample
    decoder.upsamples.{i}.upsamples.3: resample.1 [out, out, 3, 3], time_conv [2 out, out, 3, 1, 1] (i = 0, 1).
    The DupUp3D shortcut of the level has no parameters.
  diffusers: decoder.conv1 -> decoder.conv_in, decoder.head.0 -> decoder.norm_out, decoder.head.2 ->
    decoder.conv_out, conv2 -> post_quant_conv, middle and ResidualBlock names as in the encoder;
    Wan 2.1: decoder.upsamples.{k} -> decoder.up_blocks.{k div 4}.resnets.{k mod 4} (k mod 4 < 3) or
    decoder.up_blocks.{k div 4}.upsamplers.0 (k mod 4 = 3);
    Wan 2.2: decoder.upsamples.{i}.upsamples.{j} -> decoder.up_blocks.{i}.resnets.{j} (j < 3) or
    decoder.up_blocks.{i}.upsampler (j = 3); resample.1 / time_conv names kept.
  Decoder weights are scaled like the encoder's except decoder.head.2.weight (x HEAD_GAIN), which keeps the
  output mostly inside (-1, 1) so that the final clamp hides nothing.

--with-decoder-stub adds tensors an encoder loader must ignore: official/comfy ``conv2.*`` [z,z,1,1,1],
``decoder.conv1.weight``, ``decoder.middle.0.residual.0.gamma`` (and for 2.2
``decoder.upsamples.0.upsamples.0.residual.2.weight``); diffusers ``post_quant_conv.*``,
``decoder.conv_in.weight``, ``decoder.mid_block.resnets.0.norm1.gamma``,
``decoder.up_blocks.0.resnets.0.conv1.weight`` (else ``decoder.upsamples.0.residual.2.weight`` for official 2.1).

Weight scales keep activations O(1): conv weights N(0, 1/fan_in), biases N(0, 0.1^2), gammas 1 + 0.1 N(0,1).

Run with scripts/python.
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
DEC_TEMPORAL = (True, True, False)  # decoder levels 0..2: upsample3d, upsample3d, upsample2d
HEAD_GAIN = 0.5  # decoder.head.2.weight scale (output mostly inside (-1, 1))


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


def decoder_levels(variant, dim):
    """The decoder's 4 levels, in order: dicts with blocks (3 prefixes), up (Resample prefix or None),
    temporal (whether the Resample is upsample3d), cin, cout (the level's widths), dup (Wan 2.2: the level
    input goes through a DupUp3D shortcut; on every level with a Resample)."""
    dims = [dim * DIM_MULT[-1]] + [dim * m for m in DIM_MULT[::-1]]
    out = []
    for i in range(4):
        cin, cout = dims[i], dims[i + 1]
        if variant == "2.1":
            if i > 0:
                cin //= 2  # the previous level's Resample halves the channels
            blocks = ["decoder.upsamples.%d" % (4 * i + j) for j in range(3)]
            up = "decoder.upsamples.%d" % (4 * i + 3) if i < 3 else None
        else:
            blocks = ["decoder.upsamples.%d.upsamples.%d" % (i, j) for j in range(3)]
            up = "decoder.upsamples.%d.upsamples.3" % i if i < 3 else None
        out.append({"blocks": blocks, "up": up, "temporal": i < 3 and DEC_TEMPORAL[i], "cin": cin, "cout": cout,
                    "dup": variant == "2.2" and up is not None})
    return out


def _add_resblock(s, p, a, b):
    s[p + ".residual.0.gamma"] = (a, 1, 1, 1)
    s[p + ".residual.2.weight"] = (b, a, 3, 3, 3)
    s[p + ".residual.2.bias"] = (b,)
    s[p + ".residual.3.gamma"] = (b, 1, 1, 1)
    s[p + ".residual.6.weight"] = (b, b, 3, 3, 3)
    s[p + ".residual.6.bias"] = (b,)
    if a != b:
        s[p + ".shortcut.weight"] = (b, a, 1, 1, 1)
        s[p + ".shortcut.bias"] = (b,)


def _add_middle(s, side, c):
    _add_resblock(s, side + ".middle.0", c, c)
    s[side + ".middle.1.norm.gamma"] = (c, 1, 1)
    s[side + ".middle.1.to_qkv.weight"] = (3 * c, c, 1, 1)
    s[side + ".middle.1.to_qkv.bias"] = (3 * c,)
    s[side + ".middle.1.proj.weight"] = (c, c, 1, 1)
    s[side + ".middle.1.proj.bias"] = (c,)
    _add_resblock(s, side + ".middle.2", c, c)


def decoder_shapes(variant="2.1", dim=8, z=None, out_channels=3):
    """Ordered {canonical name: shape} of the decoder and the VAE-level conv2 (decoder width `dim`)."""
    if variant not in VARIANTS:
        raise ValueError("variant must be one of %s" % (VARIANTS,))
    z = DEFAULT_Z[variant] if z is None else z
    cout = out_channels * (4 if variant == "2.2" else 1)
    s = OrderedDict()
    c0 = dim * DIM_MULT[-1]
    s["decoder.conv1.weight"] = (c0, z, 3, 3, 3)
    s["decoder.conv1.bias"] = (c0,)
    _add_middle(s, "decoder", c0)
    for lv in decoder_levels(variant, dim):
        a = lv["cin"]
        for p in lv["blocks"]:
            _add_resblock(s, p, a, lv["cout"])
            a = lv["cout"]
        if lv["up"] is not None:
            c = lv["cout"]
            c_sp = c // 2 if variant == "2.1" else c
            s[lv["up"] + ".resample.1.weight"] = (c_sp, c, 3, 3)
            s[lv["up"] + ".resample.1.bias"] = (c_sp,)
            if lv["temporal"]:
                s[lv["up"] + ".time_conv.weight"] = (2 * c, c, 3, 1, 1)
                s[lv["up"] + ".time_conv.bias"] = (2 * c,)
    s["decoder.head.0.gamma"] = (dim, 1, 1, 1)
    s["decoder.head.2.weight"] = (cout, dim, 3, 3, 3)
    s["decoder.head.2.bias"] = (cout,)
    s["conv2.weight"] = (z, z, 1, 1, 1)
    s["conv2.bias"] = (z,)
    return s


def canonical_shapes(variant="2.1", dim=8, z=None, in_channels=3, decoder_dim=None):
    """Ordered {canonical name: shape} of the encoder and the VAE-level conv1, then (decoder_dim given) the
    decoder and conv2."""
    if variant not in VARIANTS:
        raise ValueError("variant must be one of %s" % (VARIANTS,))
    z = DEFAULT_Z[variant] if z is None else z
    cin = in_channels * (4 if variant == "2.2" else 1)
    s = OrderedDict()

    def conv3(name, cout, cin_):
        s[name + ".weight"] = (cout, cin_, 3, 3, 3)
        s[name + ".bias"] = (cout,)

    def resblock(p, a, b):
        _add_resblock(s, p, a, b)

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
    _add_middle(s, "encoder", c)
    s["encoder.head.0.gamma"] = (c, 1, 1, 1)
    conv3("encoder.head.2", 2 * z, c)
    s["conv1.weight"] = (2 * z, 2 * z, 1, 1, 1)
    s["conv1.bias"] = (2 * z,)
    if decoder_dim is not None:
        s.update(decoder_shapes(variant, decoder_dim, z, in_channels))
    return s


def make_state(variant="2.1", dim=8, z=None, in_channels=3, seed=0, decoder_dim=None):
    """Random float64 weights with O(1) activations (see the module docstring).  decoder_dim: also the decoder
    (its weights are drawn after the encoder's, so the encoder does not depend on it)."""
    gen = torch.Generator().manual_seed(int(seed))
    state = OrderedDict()
    for name, shape in canonical_shapes(variant, dim, z, in_channels, decoder_dim).items():
        r = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name.endswith(".gamma"):
            t = 1.0 + 0.1 * r
        elif name.endswith(".bias"):
            t = 0.1 * r
        else:
            fan_in = int(math.prod(shape[1:]))
            t = r / math.sqrt(fan_in)
            if name == "decoder.head.2.weight":
                t = t * HEAD_GAIN
        state[name] = t
    return state


# ------------------------------------------------------------------------------------------ layouts

_RES_DIFFUSERS = [(".residual.0.", ".norm1."), (".residual.2.", ".conv1."), (".residual.3.", ".norm2."),
                  (".residual.6.", ".conv2."), (".shortcut.", ".conv_shortcut.")]


def _diffusers_name(canon, variant):
    n = canon
    if n.startswith("conv1."):
        return "quant_conv." + n[len("conv1."):]
    if n.startswith("conv2."):
        return "post_quant_conv." + n[len("conv2."):]
    for side in ("encoder", "decoder"):
        for a, b in (("conv1", "conv_in"), ("head.0", "norm_out"), ("head.2", "conv_out")):
            if n.startswith("%s.%s." % (side, a)):
                return "%s.%s.%s" % (side, b, n[len(side) + len(a) + 2:])
    n = re.sub(r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0.", n)
    n = re.sub(r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1.", n)
    n = re.sub(r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0.", n)
    if variant == "2.1":
        n = re.sub(r"^encoder\.downsamples\.(\d+)\.", r"encoder.down_blocks.\1.", n)
        m = re.match(r"^decoder\.upsamples\.(\d+)\.(.*)$", n)
        if m:
            k, rest = int(m.group(1)), m.group(2)
            sub = "upsamplers.0" if k % 4 == 3 else "resnets.%d" % (k % 4)
            n = "decoder.up_blocks.%d.%s.%s" % (k // 4, sub, rest)
    else:
        m = re.match(r"^(encoder|decoder)\.(down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)$", n)
        if m:
            side, kind, level, j, rest = m.groups()
            if rest.startswith("resample.") or rest.startswith("time_conv."):
                n = "%s.%s_blocks.%s.%ssampler.%s" % (side, kind, level, kind, rest)
            else:
                n = "%s.%s_blocks.%s.resnets.%s.%s" % (side, kind, level, j, rest)
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
        if "decoder.conv1.weight" in stored:
            raise ValueError("a decoder stub with a full decoder")
        arch = infer_arch(stored)
        out.update(decoder_stub(variant, layout, arch["z"], arch["dim"], seed))
    V.write_safetensors(path, out, dtype=dtype, metadata=metadata)
    return stored


def make_checkpoint(path, variant="2.1", dim=8, z=None, in_channels=3, layout="official", dtype="F32", seed=0,
                    with_decoder_stub=False, decoder_dim=None):
    state = make_state(variant, dim, z, in_channels, seed, decoder_dim)
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


def infer_decoder_arch(state):
    """{variant, dim, z, out_channels} of a canonical decoder state (decoder.* and conv2.*)."""
    variant = "2.2" if any(k.startswith("decoder.upsamples.0.upsamples.") for k in state) else "2.1"
    head = state["decoder.head.2.weight"]
    cout = int(head.shape[0])
    if variant == "2.2":
        if cout % 4:
            raise ValueError("Wan 2.2 decoder.head.2 has %d output channels, not a multiple of 4" % cout)
        cout //= 4
    return {"variant": variant, "dim": int(head.shape[1]), "z": int(state["conv2.weight"].shape[0]),
            "out_channels": cout}


def load_wan_state(path, decoder=False):
    """(canonical float64 state, info) of a Wan encoder checkpoint in any layout; info has variant, dim, z,
    in_channels, layout (and decoder_dim with decoder=True).  Decoder tensors and anything not in the encoder
    are ignored unless decoder=True, which loads the decoder and conv2 as well."""
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
    decoder_dim = None
    if decoder:
        head = tensors.get("decoder.conv_out.weight" if layout == "diffusers" else
                           ("vae." if layout == "comfy" else "") + "decoder.head.2.weight")
        if head is None:
            raise KeyError("%s: no decoder (decoder.head.2 / decoder.conv_out)" % path)
        decoder_dim = int(head.shape[1])
    state = OrderedDict()
    for canon, shape in canonical_shapes(variant, dim, z, cin, decoder_dim).items():
        stored = layout_name(canon, variant, layout)
        if stored not in tensors:
            raise KeyError("%s: tensor %s (%s) missing" % (path, stored, canon))
        t = tensors[stored]
        if tuple(t.shape) != tuple(shape):
            raise ValueError("%s: %s has shape %s, expected %s" % (path, stored, tuple(t.shape), shape))
        state[canon] = t
    info = {"variant": variant, "dim": dim, "z": z, "in_channels": cin, "layout": layout}
    if decoder:
        info["decoder_dim"] = decoder_dim
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
    ap.add_argument("--with-decoder", action="store_true", help="the whole decoder and conv2 as well")
    ap.add_argument("--decoder-dim", type=int, default=None, help="decoder width (default: --dim)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.with_decoder and a.with_decoder_stub:
        ap.error("--with-decoder and --with-decoder-stub exclude each other")
    decoder_dim = (a.decoder_dim or a.dim) if a.with_decoder else None
    stored = make_checkpoint(a.out, a.variant, a.dim, a.z, a.in_channels, a.layout, a.dtype, a.seed,
                             a.with_decoder_stub, decoder_dim)
    arch = infer_arch(stored)
    print("wrote %s: Wan %s, dim %d, z %d, %d tensors, layout %s, %s%s"
          % (a.out, a.variant, arch["dim"], arch["z"], len(stored), a.layout, a.dtype,
             ", with decoder stub" if a.with_decoder_stub else
             (", with decoder (dim %d)" % decoder_dim if decoder_dim else "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
