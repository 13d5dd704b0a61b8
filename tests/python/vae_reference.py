#!/usr/bin/env python3
"""Reference implementation and test-data generator for the vaeencode element.

Importable module and command-line tool.  Written from the architecture description in
shared/notes/reference-semantics.md (LDM ``Encoder`` of the KL autoencoder used by Stable Diffusion,
diffusers ``AutoencoderKL`` key layout).  Everything is computed in float64 with torch.nn.functional.

Contents
--------
read_safetensors / write_safetensors   minimal safetensors I/O (F32, F16, BF16; F64 on read)
make_checkpoint                        random KL-VAE weights (encoder and full decoder) in one of several key layouts
load_ldm_state / infer_arch            read any layout back into canonical LDM names (encoder or decoder part)
infer_decoder_arch                     the decoder's architecture from canonical names/shapes
encode_reference                       crop + normalise + Encoder (+quant_conv) -> (mean, logvar)
decoder_forward / decode_reference     (post_quant_conv +) Decoder; ComfyUI's clamp((x+1)/2) and 8-bit pixels
unpack_frames / make_frames            packed RGB-ish byte buffers <-> N x H x W x 3 uint8
apply_latent_format                    raw / sd15 / sdxl / sd3 / flux / custom scaling

CLI:  make-checkpoint | make-frames | encode | inspect | selftest   (see --help of each)

Run with scripts/python (needs torch and numpy).
"""

import argparse
import json
import math
import re
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------

_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _decode_tensor(buf, dtype, shape):
    if dtype == "F64":
        arr = np.frombuffer(buf, dtype="<f8").astype(np.float64)
    elif dtype == "F32":
        arr = np.frombuffer(buf, dtype="<f4").astype(np.float64)
    elif dtype == "F16":
        arr = np.frombuffer(buf, dtype="<f2").astype(np.float64)
    elif dtype == "BF16":
        bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        arr = bits.view(np.float32).astype(np.float64)
    else:
        raise ValueError("unsupported safetensors dtype %r" % dtype)
    return torch.from_numpy(arr.reshape(shape).copy())


def read_safetensors(path, key_filter=None):
    """Read a safetensors file.

    Returns (tensors, metadata): tensors maps name -> torch.float64 tensor, metadata is the
    ``__metadata__`` dict (or {}).  ``key_filter(name) -> bool`` skips tensors (their bytes are not read).
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("%s: file shorter than 8 bytes" % path)
        (hlen,) = struct.unpack("<Q", head)
        f.seek(0, 2)
        fsize = f.tell()
        if hlen > fsize - 8:
            raise ValueError("%s: header length %d exceeds file size" % (path, hlen))
        f.seek(8)
        header = json.loads(f.read(hlen).decode("utf-8"))
        data_start = 8 + hlen
        metadata = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in header.items():
            if key_filter is not None and not key_filter(name):
                continue
            dtype = info["dtype"]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(v) for v in info["data_offsets"])
            if dtype not in _DTYPE_SIZE:
                raise ValueError("%s: tensor %s has unsupported dtype %s" % (path, name, dtype))
            nbytes = _DTYPE_SIZE[dtype] * int(np.prod(shape, dtype=np.int64))
            if end - begin != nbytes or begin < 0 or data_start + end > fsize:
                raise ValueError("%s: tensor %s has bad data_offsets" % (path, name))
            f.seek(data_start + begin)
            tensors[name] = _decode_tensor(f.read(nbytes), dtype, shape)
    return tensors, metadata


def round_to_dtype(t, dtype):
    """Round a tensor the way it will be stored as ``dtype`` (returned as float64)."""
    t32 = t.detach().to(torch.float32)
    if dtype == "F32":
        return t32.to(torch.float64)
    if dtype == "F16":
        return t32.to(torch.float16).to(torch.float64)
    if dtype == "BF16":
        return t32.to(torch.bfloat16).to(torch.float64)
    if dtype == "F64":
        return t.detach().to(torch.float64)
    raise ValueError("unsupported dtype %r" % dtype)


def _encode_tensor(t, dtype):
    t = t.detach().cpu().contiguous()
    if dtype == "F64":
        return t.to(torch.float64).numpy().astype("<f8").tobytes()
    if dtype == "F32":
        return t.to(torch.float32).numpy().astype("<f4").tobytes()
    if dtype == "F16":
        return t.to(torch.float32).to(torch.float16).numpy().astype("<f2").tobytes()
    if dtype == "BF16":
        bits = t.to(torch.float32).to(torch.bfloat16).view(torch.int16).numpy()
        return bits.astype("<i2").tobytes()
    raise ValueError("unsupported dtype %r" % dtype)


def write_safetensors(path, tensors, dtype="F32", metadata=None):
    """Write ``tensors`` (name -> torch.Tensor) as a safetensors file, all in ``dtype``.

    Tensors are stored in sorted-name order, the JSON header is padded with spaces so that the data
    starts at a multiple of 8 bytes, offsets are relative to the end of the header.
    """
    if dtype not in ("F32", "F16", "BF16", "F64"):
        raise ValueError("unsupported dtype %r" % dtype)
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        blob = _encode_tensor(t, dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-len(hjson)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for blob in blobs:
            f.write(blob)


# --------------------------------------------------------------------------------------------------
# canonical (LDM) <-> diffusers names
# --------------------------------------------------------------------------------------------------

LAYOUTS = ("ldm", "first_stage_model", "vae", "diffusers", "diffusers_old")

_ATTN_NEW = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_OLD = {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}
_ATTN_FROM_DIFFUSERS = {}
for _d in (_ATTN_NEW, _ATTN_OLD):
    for _k, _v in _d.items():
        _ATTN_FROM_DIFFUSERS[_v] = _k


def ldm_to_diffusers_name(name, old=False, levels=None):
    """Map a canonical LDM key to its diffusers AutoencoderKL name.

    Decoder keys need ``levels`` (number of up levels): diffusers numbers ``decoder.up_blocks`` from the
    deepest level, so LDM ``decoder.up.{i}`` is ``decoder.up_blocks.{levels-1-i}``.
    """
    if name.startswith("decoder.") or name.startswith("post_quant_conv."):
        return _ldm_to_diffusers_decoder_name(name, old, levels)
    m = re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)", name)
    if m:
        part = "conv_shortcut" if m.group(3) == "nin_shortcut" else m.group(3)
        return "encoder.down_blocks.%s.resnets.%s.%s.%s" % (m.group(1), m.group(2), part, m.group(4))
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", name)
    if m:
        return "encoder.down_blocks.%s.downsamplers.0.conv.%s" % (m.group(1), m.group(2))
    m = re.fullmatch(r"encoder\.mid\.block_([12])\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)", name)
    if m:
        part = "conv_shortcut" if m.group(2) == "nin_shortcut" else m.group(2)
        return "encoder.mid_block.resnets.%d.%s.%s" % (int(m.group(1)) - 1, part, m.group(3))
    m = re.fullmatch(r"encoder\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", name)
    if m:
        table = _ATTN_OLD if old else _ATTN_NEW
        return "encoder.mid_block.attentions.0.%s.%s" % (table[m.group(1)], m.group(2))
    m = re.fullmatch(r"encoder\.norm_out\.(weight|bias)", name)
    if m:
        return "encoder.conv_norm_out.%s" % m.group(1)
    if re.fullmatch(r"(encoder\.conv_in|encoder\.conv_out|quant_conv)\.(weight|bias)", name):
        return name
    raise KeyError("no diffusers name for %r" % name)


def _ldm_to_diffusers_decoder_name(name, old, levels):
    m = re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)", name)
    if m:
        part = "conv_shortcut" if m.group(3) == "nin_shortcut" else m.group(3)
        return "decoder.up_blocks.%d.resnets.%s.%s.%s" % (levels - 1 - int(m.group(1)), m.group(2), part, m.group(4))
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", name)
    if m:
        return "decoder.up_blocks.%d.upsamplers.0.conv.%s" % (levels - 1 - int(m.group(1)), m.group(2))
    m = re.fullmatch(r"decoder\.mid\.block_([12])\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)", name)
    if m:
        part = "conv_shortcut" if m.group(2) == "nin_shortcut" else m.group(2)
        return "decoder.mid_block.resnets.%d.%s.%s" % (int(m.group(1)) - 1, part, m.group(3))
    m = re.fullmatch(r"decoder\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", name)
    if m:
        table = _ATTN_OLD if old else _ATTN_NEW
        return "decoder.mid_block.attentions.0.%s.%s" % (table[m.group(1)], m.group(2))
    m = re.fullmatch(r"decoder\.norm_out\.(weight|bias)", name)
    if m:
        return "decoder.conv_norm_out.%s" % m.group(1)
    if re.fullmatch(r"(decoder\.conv_in|decoder\.conv_out|post_quant_conv)\.(weight|bias)", name):
        return name
    raise KeyError("no diffusers name for %r" % name)


def diffusers_to_ldm_decoder_name(name, levels):
    """diffusers decoder/post_quant_conv key -> canonical LDM key (None if not one); ``levels`` as above."""
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)", name)
    if m:
        part = "nin_shortcut" if m.group(3) == "conv_shortcut" else m.group(3)
        return "decoder.up.%d.block.%s.%s.%s" % (levels - 1 - int(m.group(1)), m.group(2), part, m.group(4))
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", name)
    if m:
        return "decoder.up.%d.upsample.conv.%s" % (levels - 1 - int(m.group(1)), m.group(2))
    m = re.fullmatch(r"decoder\.mid_block\.resnets\.([01])\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)", name)
    if m:
        part = "nin_shortcut" if m.group(2) == "conv_shortcut" else m.group(2)
        return "decoder.mid.block_%d.%s.%s" % (int(m.group(1)) + 1, part, m.group(3))
    m = re.fullmatch(r"decoder\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.(weight|bias)", name)
    if m:
        return "decoder.mid.attn_1.%s.%s" % (_ATTN_FROM_DIFFUSERS[m.group(1)], m.group(2))
    m = re.fullmatch(r"decoder\.conv_norm_out\.(weight|bias)", name)
    if m:
        return "decoder.norm_out.%s" % m.group(1)
    if re.fullmatch(r"(decoder\.conv_in|decoder\.conv_out|post_quant_conv)\.(weight|bias)", name):
        return name
    return None


def diffusers_to_ldm_name(name):
    """Inverse of ldm_to_diffusers_name (accepts both attention spellings); None if not an encoder key."""
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)", name)
    if m:
        part = "nin_shortcut" if m.group(3) == "conv_shortcut" else m.group(3)
        return "encoder.down.%s.block.%s.%s.%s" % (m.group(1), m.group(2), part, m.group(4))
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", name)
    if m:
        return "encoder.down.%s.downsample.conv.%s" % (m.group(1), m.group(2))
    m = re.fullmatch(r"encoder\.mid_block\.resnets\.([01])\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)", name)
    if m:
        part = "nin_shortcut" if m.group(2) == "conv_shortcut" else m.group(2)
        return "encoder.mid.block_%d.%s.%s" % (int(m.group(1)) + 1, part, m.group(3))
    m = re.fullmatch(r"encoder\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.(weight|bias)", name)
    if m:
        return "encoder.mid.attn_1.%s.%s" % (_ATTN_FROM_DIFFUSERS[m.group(1)], m.group(2))
    m = re.fullmatch(r"encoder\.conv_norm_out\.(weight|bias)", name)
    if m:
        return "encoder.norm_out.%s" % m.group(1)
    if re.fullmatch(r"(encoder\.conv_in|encoder\.conv_out|quant_conv)\.(weight|bias)", name):
        return name
    return None


_ATTN_WEIGHT_RE = re.compile(r"(?:en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def layout_name(canon, layout, levels=None):
    """Name under which canonical key ``canon`` is stored in ``layout`` (``levels``: see ldm_to_diffusers_name)."""
    if layout == "ldm":
        return canon
    if layout == "first_stage_model":
        return "first_stage_model." + canon
    if layout == "vae":
        return "vae." + canon
    if layout == "diffusers":
        return ldm_to_diffusers_name(canon, old=False, levels=levels)
    if layout == "diffusers_old":
        return ldm_to_diffusers_name(canon, old=True, levels=levels)
    raise ValueError("unknown layout %r" % layout)


# --------------------------------------------------------------------------------------------------
# random checkpoints
# --------------------------------------------------------------------------------------------------


def _parse_mult(mult):
    if isinstance(mult, str):
        mult = [int(s) for s in mult.split(",") if s.strip()]
    return tuple(int(m) for m in mult)


def canonical_shapes(ch=128, mult=(1, 2, 4, 4), blocks=2, z=4, quant_conv=True):
    """Ordered list of (canonical name, shape, kind) for an encoder; kind in conv|bias|gn_w|gn_b."""
    mult = _parse_mult(mult)
    out = []

    def conv(name, cout, cin, k):
        out.append((name + ".weight", (cout, cin, k, k), "conv"))
        out.append((name + ".bias", (cout,), "bias"))

    def norm(name, c):
        out.append((name + ".weight", (c,), "gn_w"))
        out.append((name + ".bias", (c,), "gn_b"))

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cout, cin, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    conv("encoder.conv_in", ch, 3, 3)
    cin = ch
    for i, m in enumerate(mult):
        cout = ch * m
        for j in range(blocks):
            resnet("encoder.down.%d.block.%d" % (i, j), cin, cout)
            cin = cout
        if i != len(mult) - 1:
            conv("encoder.down.%d.downsample.conv" % i, cin, cin, 3)
    c = cin
    resnet("encoder.mid.block_1", c, c)
    norm("encoder.mid.attn_1.norm", c)
    for p in ("q", "k", "v", "proj_out"):
        conv("encoder.mid.attn_1." + p, c, c, 1)
    resnet("encoder.mid.block_2", c, c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", 2 * z, c, 3)
    if quant_conv:
        conv("quant_conv", 2 * z, 2 * z, 1)
    return out


def canonical_decoder_shapes(ch=128, mult=(1, 2, 4, 4), blocks=3, z=4, post_quant_conv=True):
    """Ordered (canonical name, shape, kind) for a decoder; ``blocks`` ResnetBlocks per level (3 in released
    models: the encoder's num_res_blocks + 1)."""
    mult = _parse_mult(mult)
    out = []

    def conv(name, cout, cin, k):
        out.append((name + ".weight", (cout, cin, k, k), "conv"))
        out.append((name + ".bias", (cout,), "bias"))

    def norm(name, c):
        out.append((name + ".weight", (c,), "gn_w"))
        out.append((name + ".bias", (c,), "gn_b"))

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cout, cin, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    if post_quant_conv:
        conv("post_quant_conv", z, z, 1)
    c = ch * mult[-1]
    conv("decoder.conv_in", c, z, 3)
    resnet("decoder.mid.block_1", c, c)
    norm("decoder.mid.attn_1.norm", c)
    for p in ("q", "k", "v", "proj_out"):
        conv("decoder.mid.attn_1." + p, c, c, 1)
    resnet("decoder.mid.block_2", c, c)
    cin = c
    for i in reversed(range(len(mult))):
        cout = ch * mult[i]
        for j in range(blocks):
            resnet("decoder.up.%d.block.%d" % (i, j), cin, cout)
            cin = cout
        if i != 0:
            conv("decoder.up.%d.upsample.conv" % i, cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", 3, cin, 3)
    return out


# conv_out of a random decoder is scaled down so that most outputs stay inside [-1, 1]: a comparison after
# ComfyUI's clamp would otherwise see mostly 0s and 1s.
DECODER_OUT_SCALE = 0.6


def _rand(kind, shape, gen):
    n = torch.randn(shape, generator=gen, dtype=torch.float32)
    if kind == "conv":
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return n / math.sqrt(fan_in)
    if kind == "bias":
        return 0.05 * n
    if kind == "gn_w":
        return 1.0 + 0.1 * n
    if kind == "gn_b":
        return 0.1 * n
    raise ValueError(kind)


def _unrelated_tensors(gen):
    """Tensors of a full model checkpoint outside its VAE (first_stage_model layout)."""
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn((32, 4, 3, 3), generator=gen) * 0.1,
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn((32,), generator=gen) * 0.1,
        "model.diffusion_model.out.2.weight": torch.randn((4, 32, 3, 3), generator=gen) * 0.1,
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight":
            torch.randn((8, 16), generator=gen) * 0.1,
        "model_ema.decay": torch.tensor(0.9999),  # 0-d tensor (shape [])
    }


def make_checkpoint(path, layout="ldm", ch=32, mult=(1, 2), blocks=2, z=4, quant_conv=True, dtype="F32",
                    seed=0, include_decoder=True, drop=(), include_encoder=True, decoder_blocks=None,
                    return_decoder=False):
    """Write a random KL-VAE checkpoint; return the canonical float64 encoder tensors as stored.

    The file holds the encoder (+ quant_conv) and, with ``include_decoder``, a whole decoder
    (+ post_quant_conv when ``quant_conv``) with ``decoder_blocks`` ResnetBlocks per level (default
    blocks + 1, as released models have). Encoder values depend only on (ch, mult, blocks, z, quant_conv,
    seed) and decoder values only on (ch, mult, decoder_blocks, z, quant_conv, seed) -- not on layout, dtype
    (apart from rounding) or on the other part.  ``drop`` lists canonical keys (either part) to leave out.
    With ``return_decoder`` returns (encoder tensors, decoder tensors).
    """
    mult = _parse_mult(mult)
    if layout not in LAYOUTS:
        raise ValueError("layout must be one of %s" % (LAYOUTS,))
    for m in mult:
        if (ch * m) % 32:
            raise ValueError("all widths must be multiples of 32 (GroupNorm groups)")
    gen = torch.Generator().manual_seed(int(seed))
    canon32 = {}
    for name, shape, kind in canonical_shapes(ch, mult, blocks, z, quant_conv):
        canon32[name] = _rand(kind, shape, gen)
    if not include_encoder:
        canon32 = {}
    dec32 = {}
    if include_decoder:
        dgen = torch.Generator().manual_seed(int(seed) * 7919 + 104729)  # its own stream: encoder values unchanged
        dblocks = blocks + 1 if decoder_blocks is None else int(decoder_blocks)
        for name, shape, kind in canonical_decoder_shapes(ch, mult, dblocks, z, quant_conv):
            dec32[name] = _rand(kind, shape, dgen)
        dec32["decoder.conv_out.weight"] = dec32["decoder.conv_out.weight"] * DECODER_OUT_SCALE
    for k in drop:
        if k in canon32:
            del canon32[k]
        elif k in dec32:
            del dec32[k]
        else:
            raise KeyError("--drop: %r is not a canonical key of this architecture" % k)

    stored = {}
    returned = {}
    returned_dec = {}
    for part, target in ((canon32, returned), (dec32, returned_dec)):
        for name, t in part.items():
            target[name] = round_to_dtype(t, dtype)
            out = t
            if layout in ("diffusers", "diffusers_old") and _ATTN_WEIGHT_RE.fullmatch(name):
                out = t.reshape(t.shape[0], t.shape[1])
            stored[layout_name(name, layout, levels=len(mult))] = out

    if layout == "first_stage_model":
        stored.update(_unrelated_tensors(gen))

    meta = {"format": "pt", "generator": "vae_reference.py", "layout": layout}
    write_safetensors(path, stored, dtype=dtype, metadata=meta)
    return (returned, returned_dec) if return_decoder else returned


# --------------------------------------------------------------------------------------------------
# loading any layout into canonical names
# --------------------------------------------------------------------------------------------------


def _canonical_from_stored(name, part="encoder", levels=None):
    """Map a stored key (any layout, prefix stripped) to a canonical key of ``part``, or None to ignore it."""
    if part == "decoder":
        if name.startswith("decoder.up_blocks.") or name.startswith("decoder.mid_block.") or \
                name.startswith("decoder.conv_norm_out."):
            return diffusers_to_ldm_decoder_name(name, levels)
        if name.startswith("decoder.") or name.startswith("post_quant_conv."):
            return name
        return None
    if name.startswith("encoder.down_blocks.") or name.startswith("encoder.mid_block.") or \
            name.startswith("encoder.conv_norm_out."):
        return diffusers_to_ldm_name(name)
    if name.startswith("encoder.") or name.startswith("quant_conv."):
        return name
    return None


def load_ldm_state(path, part="encoder"):
    """Read a checkpoint in any supported layout; return the canonical LDM-named float64 tensors of ``part``
    ("encoder": encoder + quant_conv, "decoder": decoder + post_quant_conv)."""
    if part not in ("encoder", "decoder"):
        raise ValueError("part must be 'encoder' or 'decoder'")
    side = part + "."
    # Find the prefix from the header only (cheap), then read just that part's tensors.
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        names = [k for k in json.loads(f.read(hlen).decode("utf-8")) if k != "__metadata__"]
    prefix = ""
    for p in ("first_stage_model.", "vae."):
        if any(n.startswith(p + side) for n in names):
            prefix = p
            break
    if not prefix and not any(n.startswith(side) for n in names):
        raise ValueError("%s: no %s tensors found" % (path, part))
    levels = None
    if part == "decoder":
        ups = [int(m.group(1)) for n in names for m in [re.match(re.escape(prefix) + r"decoder\.up_blocks\.(\d+)\.", n)] if m]
        levels = max(ups) + 1 if ups else None

    def want(n):
        return n.startswith(prefix) and _canonical_from_stored(n[len(prefix):], part, levels) is not None

    raw, _ = read_safetensors(path, key_filter=want)
    state = {}
    for n, t in raw.items():
        canon = _canonical_from_stored(n[len(prefix):], part, levels)
        if canon is None:
            continue
        if _ATTN_WEIGHT_RE.fullmatch(canon) and t.dim() == 2:
            t = t.reshape(t.shape[0], t.shape[1], 1, 1)
        if canon in state:
            raise ValueError("%s: duplicate tensor for %s" % (path, canon))
        state[canon] = t
    return state


def infer_arch(state):
    """Infer dict(ch, mult, blocks, z, quant_conv, widths) from canonical tensor names/shapes."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError("encoder levels are not contiguous: %s" % levels)
    blocks_per = []
    widths = []
    for i in levels:
        js = sorted({int(m.group(1)) for k in state
                     for m in [re.match(r"encoder\.down\.%d\.block\.(\d+)\." % i, k)] if m})
        if js != list(range(len(js))) or not js:
            raise ValueError("level %d blocks are not contiguous: %s" % (i, js))
        blocks_per.append(len(js))
        widths.append(state["encoder.down.%d.block.0.conv1.weight" % i].shape[0])
    if len(set(blocks_per)) != 1:
        raise ValueError("levels have different block counts: %s" % blocks_per)
    if "encoder.conv_out.weight" not in state:
        raise KeyError("encoder.conv_out.weight missing")
    z2 = state["encoder.conv_out.weight"].shape[0]
    if z2 % 2:
        raise ValueError("conv_out has an odd number of output channels")
    return {
        "ch": int(ch),
        "mult": tuple(int(w // ch) for w in widths),
        "widths": tuple(int(w) for w in widths),
        "blocks": blocks_per[0],
        "z": z2 // 2,
        "quant_conv": "quant_conv.weight" in state,
    }


# --------------------------------------------------------------------------------------------------
# the encoder (float64 reference)
# --------------------------------------------------------------------------------------------------

GN_GROUPS = 32
GN_EPS = 1e-6


def crop_offsets(d, r=8):
    """ComfyUI crop rule for one dimension: (offset, keep)."""
    keep = (d // r) * r
    return (d % r) // 2, keep


def crop_frames(frames, r=8):
    """Crop an N x H x W x C array with the ComfyUI rule."""
    _, h, w = frames.shape[:3]
    if h < r or w < r:
        raise ValueError("frame %dx%d is smaller than %d pixels" % (w, h, r))
    oy, kh = crop_offsets(h, r)
    ox, kw = crop_offsets(w, r)
    return frames[:, oy:oy + kh, ox:ox + kw]


def _p(state, name):
    try:
        return state[name]
    except KeyError:
        raise KeyError("tensor %s missing from checkpoint" % name) from None


def _conv(state, name, x, stride=1, padding=0):
    return F.conv2d(x, _p(state, name + ".weight"), _p(state, name + ".bias"), stride=stride, padding=padding)


def _norm(state, name, x):
    return F.group_norm(x, GN_GROUPS, _p(state, name + ".weight"), _p(state, name + ".bias"), eps=GN_EPS)


def resnet_block(state, name, x):
    h = F.silu(_norm(state, name + ".norm1", x))
    h = _conv(state, name + ".conv1", h, padding=1)
    h = F.silu(_norm(state, name + ".norm2", h))
    h = _conv(state, name + ".conv2", h, padding=1)
    if (name + ".nin_shortcut.weight") in state:
        x = _conv(state, name + ".nin_shortcut", x)
    return x + h


def downsample(state, name, x):
    x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
    return _conv(state, name + ".conv", x, stride=2, padding=0)


def attn_block(state, name, x):
    h = _norm(state, name + ".norm", x)
    q = _conv(state, name + ".q", h)
    k = _conv(state, name + ".k", h)
    v = _conv(state, name + ".v", h)
    b, c, hh, ww = q.shape
    q = q.reshape(b, c, hh * ww).permute(0, 2, 1)           # b, hw, c
    k = k.reshape(b, c, hh * ww)                            # b, c, hw
    w = torch.bmm(q, k) * (float(c) ** -0.5)                # b, hw(query), hw(key)
    w = torch.softmax(w, dim=2)
    v = v.reshape(b, c, hh * ww)                            # b, c, hw
    out = torch.bmm(v, w.permute(0, 2, 1))                  # b, c, hw(query)
    out = out.reshape(b, c, hh, ww)
    out = _conv(state, name + ".proj_out", out)
    return x + out


def encoder_forward(state, x, arch=None):
    """Run Encoder (+ quant_conv) on x (N x 3 x H x W, float64, in [-1, 1]); returns N x 2z x h x w."""
    if arch is None:
        arch = infer_arch(state)
    h = _conv(state, "encoder.conv_in", x, padding=1)
    levels = len(arch["mult"])
    for i in range(levels):
        for j in range(arch["blocks"]):
            h = resnet_block(state, "encoder.down.%d.block.%d" % (i, j), h)
        if i != levels - 1:
            h = downsample(state, "encoder.down.%d.downsample" % i, h)
    h = resnet_block(state, "encoder.mid.block_1", h)
    h = attn_block(state, "encoder.mid.attn_1", h)
    h = resnet_block(state, "encoder.mid.block_2", h)
    h = F.silu(_norm(state, "encoder.norm_out", h))
    h = _conv(state, "encoder.conv_out", h, padding=1)
    if arch["quant_conv"]:
        h = _conv(state, "quant_conv", h)
    return h


def frames_to_input(frames_uint8_rgb):
    """Crop + normalise N x H x W x 3 uint8 frames to an N x 3 x h x w float64 tensor in [-1, 1]."""
    frames = np.asarray(frames_uint8_rgb)
    if frames.ndim != 4 or frames.shape[3] < 3:
        raise ValueError("frames must be N x H x W x 3")
    frames = crop_frames(frames[..., :3])
    x = torch.from_numpy(np.ascontiguousarray(frames).astype(np.float64) / 255.0)
    x = x * 2.0 - 1.0
    return x.permute(0, 3, 1, 2).contiguous()


def encode_reference(state, frames_uint8_rgb, arch=None):
    """Return (mean, logvar), float64 torch tensors N x z x h x w (h = H//8, w = W//8)."""
    with torch.no_grad():
        if arch is None:
            arch = infer_arch(state)
        x = frames_to_input(frames_uint8_rgb)
        moments = encoder_forward(state, x, arch)
        z = arch["z"]
        mean = moments[:, :z].contiguous()
        logvar = torch.clamp(moments[:, z:2 * z], -30.0, 20.0).contiguous()
    return mean, logvar


def infer_decoder_arch(state):
    """dict(widths, blocks, z, post_quant_conv, upscale) from canonical decoder tensor names/shapes."""
    levels = sorted({int(m.group(1)) for k in state for m in [re.match(r"decoder\.up\.(\d+)\.", k)] if m})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError("decoder levels are not contiguous: %s" % levels)
    blocks = set()
    widths = []
    for i in levels:
        js = sorted({int(m.group(1)) for k in state
                     for m in [re.match(r"decoder\.up\.%d\.block\.(\d+)\." % i, k)] if m})
        if js != list(range(len(js))) or not js:
            raise ValueError("decoder level %d blocks are not contiguous: %s" % (i, js))
        blocks.add(len(js))
        widths.append(int(state["decoder.up.%d.block.0.conv1.weight" % i].shape[0]))
    if len(blocks) != 1:
        raise ValueError("decoder levels have different block counts: %s" % sorted(blocks))
    return {
        "widths": tuple(widths),
        "blocks": blocks.pop(),
        "z": int(state["decoder.conv_in.weight"].shape[1]),
        "post_quant_conv": "post_quant_conv.weight" in state,
        "upscale": 2 ** (len(widths) - 1),
    }


def upsample_nearest2x(x):
    """Every cell becomes a 2x2 block of its value."""
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def decoder_forward(state, z, arch=None):
    """Run (post_quant_conv +) Decoder on raw latents z (N x z x h x w float64); returns N x 3 x H x W,
    nominally in [-1, 1]."""
    if arch is None:
        arch = infer_decoder_arch(state)
    h = _conv(state, "post_quant_conv", z) if arch["post_quant_conv"] else z
    h = _conv(state, "decoder.conv_in", h, padding=1)
    h = resnet_block(state, "decoder.mid.block_1", h)
    h = attn_block(state, "decoder.mid.attn_1", h)
    h = resnet_block(state, "decoder.mid.block_2", h)
    for i in reversed(range(len(arch["widths"]))):
        for j in range(arch["blocks"]):
            h = resnet_block(state, "decoder.up.%d.block.%d" % (i, j), h)
        if i != 0:
            h = _conv(state, "decoder.up.%d.upsample.conv" % i, upsample_nearest2x(h), padding=1)
    h = F.silu(_norm(state, "decoder.norm_out", h))
    return _conv(state, "decoder.conv_out", h, padding=1)


def latents_to_raw(latents, name="raw", scale=None, shift=None):
    """Inverse of apply_latent_format: x / scale + shift."""
    if name == "raw":
        return latents
    if name == "custom":
        sh, sc = (0.0 if shift is None else shift), scale
    else:
        sh, sc = LATENT_FORMATS[name]
    return latents / sc + sh


def pixels_u8(pixels01):
    """ComfyUI SaveImage's bytes: 255 * (float32 pixels), clipped, truncated; N x 3 x H x W -> N x H x W x 3."""
    p32 = np.asarray(pixels01, dtype=np.float32)
    u8 = np.clip(np.float32(255.0) * p32, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(u8.transpose(0, 2, 3, 1))


def decode_reference(state, latents, latent_format="raw", arch=None):
    """ComfyUI's VAE.decode of ``latents`` (N x z x h x w, in ``latent_format``): returns (pixels, x) with
    x the decoder output and pixels = clamp((x + 1) / 2, 0, 1), float64 N x 3 x H x W."""
    with torch.no_grad():
        z = torch.as_tensor(np.asarray(latents), dtype=torch.float64)
        x = decoder_forward(state, latents_to_raw(z, latent_format), arch)
        return torch.clamp((x + 1.0) / 2.0, 0.0, 1.0), x


def tiled_scale(z, fn, tile_h, tile_w, overlap, upscale):
    """ComfyUI's tiled_scale for one pass (2-D, one latent at a time): tiles of tile_h x tile_w latent cells
    at steps of tile - overlap, the output of each weighted by a mask ramping (t+1)/feather over
    feather = overlap * upscale pixels on every side (not along a dimension the feather does not fit),
    summed and divided by the summed masks. A latent within one tile is decoded whole."""
    n, _, h, w = z.shape
    if h <= tile_h and w <= tile_w:
        return fn(z)
    feather = overlap * upscale
    outs = []
    for b in range(n):
        s = z[b:b + 1]
        out = div = None
        ys = range(0, h - overlap, tile_h - overlap) if h > tile_h else [0]
        xs = range(0, w - overlap, tile_w - overlap) if w > tile_w else [0]
        for y0 in ys:
            for x0 in xs:
                y, x = max(0, min(h - overlap, y0)), max(0, min(w - overlap, x0))
                ps = fn(s[:, :, y:y + tile_h, x:x + tile_w])
                if out is None:
                    out = torch.zeros((1, ps.shape[1], h * upscale, w * upscale), dtype=ps.dtype)
                    div = torch.zeros_like(out)
                mask = torch.ones_like(ps)
                for d in (2, 3):
                    size = mask.shape[d]
                    if feather >= size:
                        continue
                    for t in range(feather):
                        a = (t + 1) / feather
                        mask.narrow(d, t, 1).mul_(a)
                        mask.narrow(d, size - 1 - t, 1).mul_(a)
                oy, ox = y * upscale, x * upscale
                out[:, :, oy:oy + ps.shape[2], ox:ox + ps.shape[3]] += ps * mask
                div[:, :, oy:oy + ps.shape[2], ox:ox + ps.shape[3]] += mask
        outs.append(out / div)
    return torch.cat(outs)


def decode_tiled_reference(state, latents, tile=64, overlap=16, arch=None):
    """ComfyUI's decode_tiled_ on raw latents: the decoder output of three tiled passes (tile_x // 2,
    tile_y * 2), (tile_x * 2, tile_y // 2), (tile_x, tile_y) -- as height x width (128, 32), (32, 128),
    (64, 64) -- averaged. Returns (pixels, x) like decode_reference."""
    if arch is None:
        arch = infer_decoder_arch(state)
    up = arch["upscale"]
    with torch.no_grad():
        z = torch.as_tensor(np.asarray(latents), dtype=torch.float64)

        def fn(t):
            return decoder_forward(state, t, arch)
        x = (tiled_scale(z, fn, tile * 2, tile // 2, overlap, up) + tiled_scale(z, fn, tile // 2, tile * 2, overlap, up)
             + tiled_scale(z, fn, tile, tile, overlap, up)) / 3.0
        return torch.clamp((x + 1.0) / 2.0, 0.0, 1.0), x


# --------------------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------------------

# format -> (bytes per pixel, byte indices of R, G, B)
FORMATS = {
    "RGB": (3, (0, 1, 2)),
    "BGR": (3, (2, 1, 0)),
    "RGBA": (4, (0, 1, 2)),
    "BGRA": (4, (2, 1, 0)),
    "ARGB": (4, (1, 2, 3)),
    "ABGR": (4, (3, 2, 1)),
    "RGBx": (4, (0, 1, 2)),
    "BGRx": (4, (2, 1, 0)),
    "xRGB": (4, (1, 2, 3)),
    "xBGR": (4, (3, 2, 1)),
}


def format_bpp(fmt):
    return FORMATS[fmt][0]


def unpack_frames(raw_bytes, n, width, height, stride, fmt):
    """Packed frames (n back to back, rows ``stride`` bytes apart) -> uint8 n x H x W x 3 RGB."""
    if fmt not in FORMATS:
        raise ValueError("unknown format %r (known: %s)" % (fmt, ", ".join(FORMATS)))
    bpp, idx = FORMATS[fmt]
    if stride is None:
        stride = width * bpp
    if stride < width * bpp:
        raise ValueError("stride %d < width*bpp %d" % (stride, width * bpp))
    need = n * height * stride
    buf = np.frombuffer(raw_bytes, dtype=np.uint8)
    if buf.size < need:
        raise ValueError("need %d bytes for %d frames, got %d" % (need, n, buf.size))
    rows = buf[:need].reshape(n, height, stride)[:, :, :width * bpp].reshape(n, height, width, bpp)
    return np.ascontiguousarray(rows[..., list(idx)])


def make_frames(n, width, height, fmt, stride=None, seed=0):
    """Random packed frames as bytes: smooth colour fields plus noise; pad/x/A bytes random too.

    The RGB image depends only on (n, width, height, seed), not on fmt or stride.
    """
    bpp, idx = FORMATS[fmt]
    if stride is None:
        stride = width * bpp
    if stride < width * bpp:
        raise ValueError("stride %d < width*bpp %d" % (stride, width * bpp))
    rng = np.random.default_rng([seed, 0])
    junk = np.random.default_rng([seed, 1])
    buf = junk.integers(0, 256, size=(n, height, stride), dtype=np.uint8)  # padding / alpha stay random
    yy = np.linspace(0.0, 1.0, height)[:, None]
    xx = np.linspace(0.0, 1.0, width)[None, :]
    for f in range(n):
        img = np.zeros((height, width, 3))
        for c in range(3):
            field = np.full((height, width), rng.uniform(60, 200))
            for _ in range(4):
                fx, fy = rng.uniform(0.5, 3.0, size=2)
                px, py = rng.uniform(0, 2 * np.pi, size=2)
                field += rng.uniform(10, 40) * np.sin(2 * np.pi * fx * xx + px) * np.cos(2 * np.pi * fy * yy + py)
            img[..., c] = field
        img += rng.normal(0.0, 12.0, size=img.shape)
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        px = buf[f, :, :width * bpp].reshape(height, width, bpp).copy()
        for c in range(3):
            px[..., idx[c]] = img[..., c]
        buf[f, :, :width * bpp] = px.reshape(height, width * bpp)
    return buf.tobytes()


# --------------------------------------------------------------------------------------------------
# latent formats
# --------------------------------------------------------------------------------------------------

LATENT_FORMATS = {
    "raw": (0.0, 1.0),
    "sd15": (0.0, 0.18215),
    "sdxl": (0.0, 0.13025),
    "sd3": (0.0609, 1.5305),
    "flux": (0.1159, 0.3611),
}


def apply_latent_format(raw, name, scale=None, shift=None):
    """(raw - shift) * scale with the named factors (``custom`` takes scale/shift)."""
    if name == "custom":
        if scale is None:
            raise ValueError("custom latent format needs a scale")
        return (raw - (0.0 if shift is None else shift)) * scale
    if name not in LATENT_FORMATS:
        raise ValueError("unknown latent format %r" % name)
    sh, sc = LATENT_FORMATS[name]
    if name == "raw":
        return raw
    return (raw - sh) * sc


def write_f32(path, t):
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    with open(path, "wb") as f:
        f.write(np.ascontiguousarray(a).astype("<f4").tobytes())


def read_f32(path, shape=None):
    a = np.fromfile(path, dtype="<f4")
    if shape is not None:
        a = a.reshape(shape)
    return a


# --------------------------------------------------------------------------------------------------
# self test
# --------------------------------------------------------------------------------------------------


def _np_conv2d(x, w, b, stride=1, padding=0):
    """Independent conv (numpy, explicit sliding windows)."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    n, c, hh, ww = x.shape
    o, _, kh, kw = w.shape
    oh = (hh - kh) // stride + 1
    ow = (ww - kw) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for dy in range(kh):
        for dx in range(kw):
            patch = x[:, :, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, dy, dx])
    return out + b[None, :, None, None]


def _np_gn(x, g, b):
    n, c, hh, ww = x.shape
    xg = x.reshape(n, GN_GROUPS, -1)
    mu = xg.mean(axis=2, keepdims=True)
    var = ((xg - mu) ** 2).mean(axis=2, keepdims=True)
    y = ((xg - mu) / np.sqrt(var + GN_EPS)).reshape(n, c, hh, ww)
    return y * g[None, :, None, None] + b[None, :, None, None]


def _np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_encode(state, frames):
    """A second, numpy-only formulation of the whole encoder (used by selftest)."""
    s = {k: v.numpy() for k, v in state.items()}
    arch = infer_arch(state)
    fr = np.asarray(frames)[..., :3]
    hgt, wid = fr.shape[1:3]
    oy, ox = (hgt % 8) // 2, (wid % 8) // 2
    fr = fr[:, oy:oy + hgt // 8 * 8, ox:ox + wid // 8 * 8]
    x = np.transpose(fr.astype(np.float64) / 255.0 * 2.0 - 1.0, (0, 3, 1, 2))

    def conv(name, x, **kw):
        return _np_conv2d(x, s[name + ".weight"], s[name + ".bias"], **kw)

    def gn(name, x):
        return _np_gn(x, s[name + ".weight"], s[name + ".bias"])

    def res(name, x):
        h = conv(name + ".conv1", _np_silu(gn(name + ".norm1", x)), padding=1)
        h = conv(name + ".conv2", _np_silu(gn(name + ".norm2", h)), padding=1)
        sc = conv(name + ".nin_shortcut", x) if name + ".nin_shortcut.weight" in s else x
        return sc + h

    def attn(name, x):
        h = gn(name + ".norm", x)
        n, c, hh, ww = h.shape
        q, k, v = (conv(name + "." + p, h).reshape(n, c, -1) for p in "qkv")
        logits = np.einsum("nci,ncj->nij", q, k) / math.sqrt(c)
        logits -= logits.max(axis=2, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=2, keepdims=True)
        o = np.einsum("nij,ncj->nci", p, v).reshape(n, c, hh, ww)
        return x + conv(name + ".proj_out", o)

    def down(name, x):
        # explicit: embed into a zero canvas one larger at bottom/right, then strided conv
        n, c, hh, ww = x.shape
        canvas = np.zeros((n, c, hh + 1, ww + 1))
        canvas[:, :, :hh, :ww] = x
        return conv(name + ".conv", canvas, stride=2)

    h = conv("encoder.conv_in", x, padding=1)
    L = len(arch["mult"])
    for i in range(L):
        for j in range(arch["blocks"]):
            h = res("encoder.down.%d.block.%d" % (i, j), h)
        if i != L - 1:
            h = down("encoder.down.%d.downsample" % i, h)
    h = res("encoder.mid.block_1", h)
    h = attn("encoder.mid.attn_1", h)
    h = res("encoder.mid.block_2", h)
    h = conv("encoder.conv_out", _np_silu(gn("encoder.norm_out", h)), padding=1)
    if arch["quant_conv"]:
        h = conv("quant_conv", h)
    z = arch["z"]
    return h[:, :z], np.clip(h[:, z:], -30, 20)


def np_decode(state, latents):
    """A second, numpy-only formulation of the whole decoder (used by selftest); returns the raw output."""
    s = {k: v.numpy() for k, v in state.items()}
    arch = infer_decoder_arch(state)

    def conv(name, x, **kw):
        return _np_conv2d(x, s[name + ".weight"], s[name + ".bias"], **kw)

    def gn(name, x):
        return _np_gn(x, s[name + ".weight"], s[name + ".bias"])

    def res(name, x):
        h = conv(name + ".conv1", _np_silu(gn(name + ".norm1", x)), padding=1)
        h = conv(name + ".conv2", _np_silu(gn(name + ".norm2", h)), padding=1)
        sc = conv(name + ".nin_shortcut", x) if name + ".nin_shortcut.weight" in s else x
        return sc + h

    def attn(name, x):
        h = gn(name + ".norm", x)
        n, c, hh, ww = h.shape
        q, k, v = (conv(name + "." + p, h).reshape(n, c, -1) for p in "qkv")
        logits = np.einsum("nci,ncj->nij", q, k) / math.sqrt(c)
        logits -= logits.max(axis=2, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=2, keepdims=True)
        return x + conv(name + ".proj_out", np.einsum("nij,ncj->nci", p, v).reshape(n, c, hh, ww))

    def up(x):
        # explicit: output cell (y, x) takes input cell (y // 2, x // 2)
        n, c, hh, ww = x.shape
        ys, xs = np.arange(2 * hh) // 2, np.arange(2 * ww) // 2
        return x[:, :, ys][:, :, :, xs]

    h = np.asarray(latents, dtype=np.float64)
    if arch["post_quant_conv"]:
        h = conv("post_quant_conv", h)
    h = conv("decoder.conv_in", h, padding=1)
    h = attn("decoder.mid.attn_1", res("decoder.mid.block_1", h))
    h = res("decoder.mid.block_2", h)
    for i in reversed(range(len(arch["widths"]))):
        for j in range(arch["blocks"]):
            h = res("decoder.up.%d.block.%d" % (i, j), h)
        if i != 0:
            h = conv("decoder.up.%d.upsample.conv" % i, up(h), padding=1)
    return conv("decoder.conv_out", _np_silu(gn("decoder.norm_out", h)), padding=1)


def selftest(verbose=True):
    import os
    import tempfile

    def say(msg):
        if verbose:
            print(msg)

    fails = []

    def check(cond, msg):
        say(("ok   " if cond else "FAIL ") + msg)
        if not cond:
            fails.append(msg)

    with tempfile.TemporaryDirectory() as td:
        # 1. round trips in every layout and dtype
        for layout in LAYOUTS:
            for dtype in ("F32", "F16", "BF16"):
                p = os.path.join(td, "m_%s_%s.safetensors" % (layout, dtype))
                ref = make_checkpoint(p, layout=layout, ch=32, mult=(1, 2), blocks=2, z=4, dtype=dtype, seed=3)
                st = load_ldm_state(p)
                same = set(st) == set(ref) and all(torch.equal(st[k], ref[k]) for k in ref)
                check(same, "roundtrip layout=%s dtype=%s (%d tensors)" % (layout, dtype, len(ref)))
                arch = infer_arch(st)
                check(arch["ch"] == 32 and arch["mult"] == (1, 2) and arch["blocks"] == 2 and arch["z"] == 4
                      and arch["quant_conv"], "infer_arch %s: %s" % (layout, arch))
        # values independent of layout
        a = make_checkpoint(os.path.join(td, "a.safetensors"), layout="ldm", seed=5)
        b = make_checkpoint(os.path.join(td, "b.safetensors"), layout="diffusers_old", seed=5, include_decoder=False)
        check(all(torch.equal(a[k], b[k]) for k in a), "same seed -> same canonical values across layouts")
        # header sanity: 8-aligned, sorted, contiguous offsets
        with open(os.path.join(td, "a.safetensors"), "rb") as f:
            (hl,) = struct.unpack("<Q", f.read(8))
            hdr = json.loads(f.read(hl))
            total = os.fstat(f.fileno()).st_size
        names = [k for k in hdr if k != "__metadata__"]
        offs = [hdr[k]["data_offsets"] for k in sorted(names)]
        contiguous = all(offs[i][1] == offs[i + 1][0] for i in range(len(offs) - 1)) and offs[0][0] == 0
        check(hl % 8 == 0 and contiguous and 8 + hl + offs[-1][1] == total, "safetensors header layout")
        # bf16 rounding vs manual bit manipulation
        t = torch.randn(1000, dtype=torch.float32)
        p = os.path.join(td, "bf.safetensors")
        write_safetensors(p, {"t": t}, "BF16")
        back, _ = read_safetensors(p)
        bits = t.view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
        rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        manual = torch.from_numpy((rne & 0xFFFFFFFF).astype(np.uint32).view(np.float32).astype(np.float64))
        check(torch.equal(back["t"], manual), "BF16 round-to-nearest-even")
        # z=16 without quant_conv, 3 levels
        p = os.path.join(td, "z16.safetensors")
        make_checkpoint(p, layout="vae", ch=32, mult=(1, 2, 2), blocks=1, z=16, quant_conv=False)
        arch = infer_arch(load_ldm_state(p))
        check(arch == {"ch": 32, "mult": (1, 2, 2), "widths": (32, 64, 64), "blocks": 1, "z": 16,
                       "quant_conv": False}, "infer_arch z16/3 levels: %s" % arch)
        # drop
        p = os.path.join(td, "drop.safetensors")
        r = make_checkpoint(p, drop=["encoder.conv_out.weight"])
        check("encoder.conv_out.weight" not in load_ldm_state(p) and "encoder.conv_out.weight" not in r,
              "drop removes the key")

        # 2. shapes and crop
        p = os.path.join(td, "l4.safetensors")
        make_checkpoint(p, ch=32, mult=(1, 2, 2, 2), blocks=1)
        st = load_ldm_state(p)
        for (w, h), exp in {(64, 48): (6, 8), (45, 37): (4, 5), (8, 8): (1, 1), (23, 17): (2, 2)}.items():
            fr = unpack_frames(make_frames(2, w, h, "RGB", seed=1), 2, w, h, w * 3, "RGB")
            mean, logvar = encode_reference(st, fr)
            check(tuple(mean.shape) == (2, 4) + exp and mean.shape == logvar.shape,
                  "4-level latent shape for %dx%d: %s" % (w, h, tuple(mean.shape)))
        st = load_ldm_state(os.path.join(td, "m_ldm_F32.safetensors"))
        fr = unpack_frames(make_frames(1, 64, 48, "RGB", seed=1), 1, 64, 48, 64 * 3, "RGB")
        check(tuple(encode_reference(st, fr)[0].shape) == (1, 4, 24, 32), "2-level model: 64x48 -> 32x24")
        try:
            encode_reference(st, np.zeros((1, 16, 7, 3), np.uint8))
            check(False, "width 7 rejected")
        except ValueError as e:
            check("smaller" in str(e), "width 7 rejected: %s" % e)
        check(crop_offsets(519) == (3, 512) and crop_offsets(513) == (0, 512), "crop rule examples")

        # 3. unpack_frames for every format, with stride padding
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
        for fmt, (bpp, idx) in FORMATS.items():
            stride = 7 * bpp + 13
            buf = rng.integers(0, 256, size=(2, 5, stride), dtype=np.uint8)
            px = buf[:, :, :7 * bpp].reshape(2, 5, 7, bpp)
            for c in range(3):
                px[..., idx[c]] = rgb[..., c]
            buf[:, :, :7 * bpp] = px.reshape(2, 5, 7 * bpp)
            check(np.array_equal(unpack_frames(buf.tobytes(), 2, 7, 5, stride, fmt), rgb), "unpack %s" % fmt)
        # make_frames produces what unpack_frames expects (same image regardless of format)
        a = unpack_frames(make_frames(1, 16, 8, "RGB", seed=4), 1, 16, 8, 48, "RGB")
        b = unpack_frames(make_frames(1, 16, 8, "xBGR", stride=77, seed=4), 1, 16, 8, 77, "xBGR")
        check(a.std() > 10 and np.array_equal(a, b), "make_frames: contrast (std %.1f), same image for any "
              "format/stride" % a.std())

        # 4. attention / downsample vs alternative formulations
        g = torch.Generator().manual_seed(1)
        c = 64
        ast = {}
        for nm in ("q", "k", "v", "proj_out"):
            ast["a.%s.weight" % nm] = torch.randn((c, c, 1, 1), generator=g, dtype=torch.float64) / 8
            ast["a.%s.bias" % nm] = torch.randn((c,), generator=g, dtype=torch.float64) * 0.05
        ast["a.norm.weight"] = 1 + 0.1 * torch.randn((c,), generator=g, dtype=torch.float64)
        ast["a.norm.bias"] = 0.1 * torch.randn((c,), generator=g, dtype=torch.float64)
        x = torch.randn((2, c, 3, 5), generator=g, dtype=torch.float64)
        y1 = attn_block(ast, "a", x)
        hn = F.group_norm(x, 32, ast["a.norm.weight"], ast["a.norm.bias"], eps=1e-6)
        W = {nm: ast["a.%s.weight" % nm][:, :, 0, 0] for nm in ("q", "k", "v", "proj_out")}
        B = {nm: ast["a.%s.bias" % nm] for nm in ("q", "k", "v", "proj_out")}
        tok = hn.flatten(2).transpose(1, 2)                       # n, L, c  (Linear formulation)
        q, k, v = (tok @ W[nm].T + B[nm] for nm in ("q", "k", "v"))
        att = torch.softmax(torch.einsum("nic,njc->nij", q, k) / math.sqrt(c), dim=-1)
        o = torch.einsum("nij,njc->nic", att, v) @ W["proj_out"].T + B["proj_out"]
        y2 = x + o.transpose(1, 2).reshape(x.shape)
        check(torch.allclose(y1, y2, rtol=0, atol=1e-12), "attention vs einsum/Linear formulation "
              "(max diff %.2e)" % (y1 - y2).abs().max())
        dst = {"d.conv.weight": torch.randn((c, c, 3, 3), generator=g, dtype=torch.float64) / 24,
               "d.conv.bias": torch.randn((c,), generator=g, dtype=torch.float64)}
        for hh, ww in ((6, 8), (5, 7), (2, 2), (4, 3)):
            x = torch.randn((1, c, hh, ww), generator=g, dtype=torch.float64)
            y1 = downsample(dst, "d", x)
            y2 = torch.from_numpy(_np_conv2d(np.pad(x.numpy(), ((0, 0), (0, 0), (0, 1), (0, 1))),
                                             dst["d.conv.weight"].numpy(), dst["d.conv.bias"].numpy(), stride=2))
            # explicit per-output-pixel formula for one pixel: out[oy,ox] = sum w * xpad[2oy+dy, 2ox+dx]
            xp = F.pad(x, (0, 1, 0, 1))
            oy, ox = y1.shape[2] - 1, y1.shape[3] - 1
            manual = (dst["d.conv.weight"] * xp[0, :, 2 * oy:2 * oy + 3, 2 * ox:2 * ox + 3][None]).sum((1, 2, 3)) \
                + dst["d.conv.bias"]
            check(tuple(y1.shape[2:]) == (hh // 2, ww // 2)
                  and torch.allclose(y1, y2, atol=1e-12) and torch.allclose(y1[0, :, oy, ox], manual, atol=1e-12),
                  "downsample %dx%d -> %s" % (hh, ww, tuple(y1.shape[2:])))

        # 5. whole encoder vs independent numpy formulation (2- and 3-level models, odd size)
        for mult, blocks, zc, qc, (w, h) in (((1, 2), 2, 4, True, (45, 37)), ((1, 2, 2), 1, 16, False, (32, 24))):
            p = os.path.join(td, "np.safetensors")
            make_checkpoint(p, layout="diffusers", ch=32, mult=mult, blocks=blocks, z=zc, quant_conv=qc, seed=9)
            st = load_ldm_state(p)
            fr = unpack_frames(make_frames(2, w, h, "BGRA", seed=2), 2, w, h, w * 4, "BGRA")
            m1, l1 = encode_reference(st, fr)
            m2, l2 = np_encode(st, fr)
            rel = max(np.abs(m1.numpy() - m2).max() / np.abs(m2).max(), np.abs(l1.numpy() - l2).max() / np.abs(l2).max())
            check(rel < 1e-10, "encoder vs numpy formulation mult=%s z=%d %dx%d: rel %.2e, |mean| max %.3g, "
                  "logvar range [%.2f, %.2f]" % (mult, zc, w, h, rel, m1.abs().max(), l1.min(), l1.max()))

        # 6. decoder: round trips in every layout (diffusers numbers up_blocks from the deepest level),
        # values independent of layout, architecture, and the whole decoder vs a numpy formulation
        ref_dec = None
        for layout in LAYOUTS:
            for dtype in ("F32", "BF16"):
                p = os.path.join(td, "d_%s_%s.safetensors" % (layout, dtype))
                enc, dec = make_checkpoint(p, layout=layout, ch=32, mult=(1, 2, 2), blocks=1, z=4, dtype=dtype,
                                           seed=6, return_decoder=True)
                st = load_ldm_state(p, "decoder")
                same = set(st) == set(dec) and all(torch.equal(st[k], dec[k]) for k in dec)
                check(same and set(load_ldm_state(p)) == set(enc),
                      "decoder roundtrip layout=%s dtype=%s (%d tensors)" % (layout, dtype, len(dec)))
                if dtype == "F32":
                    if ref_dec is None:
                        ref_dec = dec
                    check(all(torch.equal(dec[k], ref_dec[k]) for k in dec), "decoder values independent of layout")
        arch = infer_decoder_arch(ref_dec)
        check(arch == {"widths": (32, 64, 64), "blocks": 2, "z": 4, "post_quant_conv": True, "upscale": 4},
              "infer_decoder_arch: %s" % arch)
        with open(os.path.join(td, "d_diffusers_F32.safetensors"), "rb") as f:
            (hl,) = struct.unpack("<Q", f.read(8))
            names = json.loads(f.read(hl))
        check("decoder.up_blocks.0.upsamplers.0.conv.weight" in names and
              "decoder.up_blocks.2.upsamplers.0.conv.weight" not in names and
              names["decoder.up_blocks.2.resnets.0.conv1.weight"]["shape"][0] == 32,
              "diffusers up_blocks.0 is the deepest level, up_blocks.2 (LDM up.0) has no upsampler")
        x = torch.randn((2, 3, 3, 5), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        check(torch.equal(upsample_nearest2x(x), F.interpolate(x, scale_factor=2.0, mode="nearest")),
              "nearest x2 upsampling")
        g = torch.Generator().manual_seed(4)
        for mult, zc, qc in (((1, 2, 2), 4, True), ((1, 2), 16, False)):
            p = os.path.join(td, "npd.safetensors")
            _, dec = make_checkpoint(p, layout="diffusers_old", ch=32, mult=mult, blocks=1, z=zc, quant_conv=qc,
                                     seed=8, return_decoder=True)
            lat = torch.randn((2, zc, 3, 5), generator=g, dtype=torch.float64)
            pixels, x1 = decode_reference(dec, lat)
            x2 = np_decode(dec, lat.numpy())
            rel = np.abs(x1.numpy() - x2).max() / np.abs(x2).max()
            check(rel < 1e-10 and tuple(x1.shape) == (2, 3, 3 * 2 ** (len(mult) - 1), 5 * 2 ** (len(mult) - 1))
                  and float(pixels.min()) >= 0 and float(pixels.max()) <= 1,
                  "decoder vs numpy formulation mult=%s z=%d: rel %.2e, output range [%.2f, %.2f]"
                  % (mult, zc, rel, float(x1.min()), float(x1.max())))
        check(np.array_equal(pixels_u8(np.array([[[[0.0, 0.5, 1.0, 0.99999]]]] * 3).reshape(1, 3, 1, 4))[0, 0, :, 0],
                             [0, 127, 255, 254]), "8-bit pixels: x255 truncated")
        lat = torch.randn((1, 4, 2, 2), generator=g, dtype=torch.float64)
        check(torch.allclose(latents_to_raw(apply_latent_format(lat, "sd3"), "sd3"), lat, atol=1e-12),
              "latents_to_raw inverts apply_latent_format")

        # 7. latent formats
        t = torch.tensor([1.0], dtype=torch.float64)
        check(abs(apply_latent_format(t, "sd3").item() - (1 - 0.0609) * 1.5305) < 1e-12
              and abs(apply_latent_format(t, "custom", scale=2.0, shift=0.5).item() - 1.0) < 1e-12
              and apply_latent_format(t, "raw").item() == 1.0, "latent formats")

    say("selftest: %s" % ("PASS" if not fails else "FAIL (%d)" % len(fails)))
    return not fails


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _cmd_make_checkpoint(a):
    mult = _parse_mult(a.mult)
    make_checkpoint(a.out, layout=a.layout, ch=a.ch, mult=mult, blocks=a.blocks, z=a.z,
                    quant_conv=not a.no_quant_conv, dtype=a.dtype, seed=a.seed,
                    include_decoder=not a.no_decoder, drop=a.drop or (), include_encoder=not a.no_encoder,
                    decoder_blocks=a.decoder_blocks)
    return 0


def _cmd_make_frames(a):
    data = make_frames(a.n, a.width, a.height, a.format, stride=a.stride, seed=a.seed)
    with open(a.out, "wb") as f:
        f.write(data)
    return 0


def _cmd_encode(a):
    state = load_ldm_state(a.model)
    with open(a.frames, "rb") as f:
        raw = f.read()
    stride = a.stride if a.stride else a.width * format_bpp(a.format)
    frames = unpack_frames(raw, a.n, a.width, a.height, stride, a.format)
    mean, logvar = encode_reference(state, frames)
    out = apply_latent_format(mean, a.latent_format, scale=a.latent_scale, shift=a.latent_shift)
    write_f32(a.out, out)
    if a.logvar_out:
        write_f32(a.logvar_out, logvar)
    print("wrote %s: %s float32 (N x z x h x w)" % (a.out, "x".join(str(s) for s in out.shape)), file=sys.stderr)
    return 0


def _cmd_inspect(a):
    state = load_ldm_state(a.model)
    arch = infer_arch(state)
    print(json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()}))
    print("%d encoder tensors, %d parameters" % (len(state), sum(t.numel() for t in state.values())))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-checkpoint", help="write a random KL-VAE checkpoint (encoder and decoder)")
    p.add_argument("--out", required=True)
    p.add_argument("--layout", default="ldm", choices=LAYOUTS)
    p.add_argument("--ch", type=int, default=32)
    p.add_argument("--mult", default="1,2")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--z", type=int, default=4)
    p.add_argument("--no-quant-conv", action="store_true")
    p.add_argument("--dtype", default="F32", choices=("F32", "F16", "BF16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-decoder", action="store_true")
    p.add_argument("--no-encoder", action="store_true", help="a decoder-only file")
    p.add_argument("--decoder-blocks", type=int, default=None, help="ResnetBlocks per decoder level (blocks + 1)")
    p.add_argument("--drop", action="append", metavar="KEY", help="canonical (LDM) key to leave out; repeatable")
    p.set_defaults(fn=_cmd_make_checkpoint)

    p = sub.add_parser("make-frames", help="write random packed frames")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--format", default="RGB", choices=list(FORMATS))
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_make_frames)

    p = sub.add_parser("encode", help="reference mean latents as little-endian float32")
    p.add_argument("--model", required=True)
    p.add_argument("--frames", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--format", default="RGB", choices=list(FORMATS))
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--latent-format", default="raw", choices=list(LATENT_FORMATS) + ["custom"])
    p.add_argument("--latent-scale", type=float, default=None)
    p.add_argument("--latent-shift", type=float, default=None)
    p.add_argument("--logvar-out", default=None, help="also write the clamped logvar (raw) here")
    p.set_defaults(fn=_cmd_encode)

    p = sub.add_parser("inspect", help="print the architecture inferred from a checkpoint")
    p.add_argument("--model", required=True)
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser("selftest", help="check this module against independent formulations")
    p.set_defaults(fn=lambda a: 0 if selftest() else 1)

    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print("error: %s" % msg, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
