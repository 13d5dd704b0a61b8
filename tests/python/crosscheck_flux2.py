#!/usr/bin/env python3
"""The Flux.2 VAE (encode and decode) of the C++ tools against a float64 reference.

usage: scripts/python tests/python/crosscheck_flux2.py ENCODE_TOOL DECODE_TOOL [--only NAME[,NAME...]] [--list]
                                                                              [--keep]

The reference is written from the official model (black-forest-labs/flux2, src/flux2/autoencoder.py,
class AutoEncoder): the KL VAE's encoder (+ quant_conv) of vae_reference.py, then the head of
AutoEncoder.encode -- the mean (first z channels), every 2x2 cell packed into channels with index
c*4 + row*2 + col (einops "... c (i pi) (j pj) -> ... (c pi pj) i j"), an eval BatchNorm with the file's
running statistics and eps 1e-4 -- and for decode its inverse (z * sqrt(var + 1e-4) + mean, unpack,
post_quant_conv + decoder). Pixels and crop follow ComfyUI: 2p - 1, centre crop to a multiple of 16;
decoded pixels clamp((x + 1) / 2, 0, 1).

Checkpoints: random weights at small widths (4 levels, so 16x16 pixels per latent cell after packing;
z = 32 as in Flux.2, so 128 latent channels; 2 ResnetBlocks per encoder level and 3 per decoder level as
in Flux.2) in the three layouts -- official (ae.safetensors: `encoder.quant_conv`,
`decoder.post_quant_conv`), comfy (ComfyUI's renaming: top-level `quant_conv`, `post_quant_conv`) and
diffusers (AutoencoderKLFlux2) -- each with `bn.running_mean`, `bn.running_var` and the I64
`bn.num_batches_tracked`, stored as F32, F16 or BF16. No real Flux.2 VAE weights are available here.

Cases pass when rel = max|a - b| / max|b| < 1e-4 (fp32 compute). Exit status 0 all passed, 1 some failed,
2 usage error.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vae_reference as V  # noqa: E402
from casekit import FAILED, RAN, run_case  # noqa: E402

FP32_TOL = 1e-4
BN_EPS = 1e-4  # AutoEncoder.bn_eps: in the code, not in the file
PATCH = 2      # AutoEncoder.ps
CROP = 16      # 8 (the KL encoder) x 2 (the packing)
LAYOUTS = ("official", "comfy", "diffusers")
# Flux.2's shapes at small widths: z = 32, four levels, 2 encoder / 3 decoder blocks per level.
ARCH = dict(ch=32, mult=(1, 2, 2, 2), blocks=2, z=32)

# --------------------------------------------------------------------------------------------------
# reference (float64)
# --------------------------------------------------------------------------------------------------


def pack(x):
    """N x C x H x W -> N x 4C x H/2 x W/2; output channel c*4 + pi*2 + pj holds x[c, 2i + pi, 2j + pj]."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 3, 5, 2, 4) \
        .reshape(n, c * PATCH * PATCH, h // PATCH, w // PATCH)


def unpack(z):
    """The inverse of pack."""
    n, c4, h, w = z.shape
    c = c4 // (PATCH * PATCH)
    return z.reshape(n, c, PATCH, PATCH, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, h * PATCH, w * PATCH)


def normalize(z, bn):
    """BatchNorm2d in eval mode, affine=False: (z - running_mean) / sqrt(running_var + eps)."""
    return (z - bn["mean"].view(1, -1, 1, 1)) / torch.sqrt(bn["var"].view(1, -1, 1, 1) + BN_EPS)


def inv_normalize(z, bn):
    return z * torch.sqrt(bn["var"].view(1, -1, 1, 1) + BN_EPS) + bn["mean"].view(1, -1, 1, 1)


def encode_reference(enc_state, bn, frames_u8):
    """ComfyUI's LATENT = the official AutoEncoder.encode of the cropped frames: N x 4z x H/16 x W/16."""
    with torch.no_grad():
        frames = V.crop_frames(np.asarray(frames_u8)[..., :3], r=CROP)
        x = torch.from_numpy(np.ascontiguousarray(frames).astype(np.float64) / 255.0) * 2.0 - 1.0
        moments = V.encoder_forward(enc_state, x.permute(0, 3, 1, 2).contiguous())
        mean = torch.chunk(moments, 2, dim=1)[0]
        return normalize(pack(mean), bn)


def decode_reference(dec_state, bn, latents):
    """ComfyUI's pixels of the official AutoEncoder.decode: clamp((x + 1) / 2, 0, 1), N x 3 x H x W."""
    with torch.no_grad():
        z = unpack(inv_normalize(torch.as_tensor(latents, dtype=torch.float64), bn))
        return torch.clamp((V.decoder_forward(dec_state, z) + 1.0) / 2.0, 0.0, 1.0)


def selftest():
    """The packing order against the einops pattern written out cell by cell, and both heads' inverses."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)
    p = pack(x)
    for c in range(3):
        for pi in range(2):
            for pj in range(2):
                assert torch.equal(p[:, c * 4 + pi * 2 + pj], x[:, c, pi::2, pj::2]), (c, pi, pj)
    assert torch.equal(unpack(p), x)
    bn = {"mean": torch.randn(12, generator=g, dtype=torch.float64),
          "var": torch.rand(12, generator=g, dtype=torch.float64) + 0.5}
    assert torch.allclose(inv_normalize(normalize(p, bn), bn), p, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------


def write_tensors(path, entries, metadata):
    """entries: (name, dtype, shape, bytes), written in this order (the I64 counter needs its own dtype)."""
    header = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, blob in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-len(hjson)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for entry in entries:
            f.write(entry[3])


def make_flux2_checkpoint(path, layout, dtype="F32", seed=0):
    """A random Flux.2 VAE in `layout`; returns (encoder state, decoder state, bn) as stored, float64."""
    tmp = path + ".kl.safetensors"
    enc, dec = V.make_checkpoint(tmp, layout="diffusers" if layout == "diffusers" else "ldm", dtype=dtype,
                                 seed=seed, return_decoder=True, decoder_blocks=ARCH["blocks"] + 1, **ARCH)
    stored, _ = V.read_safetensors(tmp)
    os.remove(tmp)
    entries = []
    for name in sorted(stored):
        out = name
        if layout == "official" and name.startswith("quant_conv."):
            out = "encoder." + name
        elif layout == "official" and name.startswith("post_quant_conv."):
            out = "decoder." + name
        t = stored[name]  # already rounded to `dtype`: re-encoding is exact
        entries.append((out, dtype, tuple(t.shape), V._encode_tensor(t, dtype)))
    g = torch.Generator().manual_seed(seed * 31 + 7)
    c = PATCH * PATCH * ARCH["z"]
    bn = {"mean": V.round_to_dtype(0.3 * torch.randn(c, generator=g, dtype=torch.float64), dtype),
          "var": V.round_to_dtype(0.25 + 2.0 * torch.rand(c, generator=g, dtype=torch.float64), dtype)}
    entries.append(("bn.running_mean", dtype, (c,), V._encode_tensor(bn["mean"], dtype)))
    entries.append(("bn.running_var", dtype, (c,), V._encode_tensor(bn["var"], dtype)))
    entries.append(("bn.num_batches_tracked", "I64", (), struct.pack("<q", 123456)))
    write_tensors(path, entries, {"format": "pt", "generator": "crosscheck_flux2.py", "layout": layout})
    return enc, dec, bn


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, encode_tool, decode_tool, tmp):
        self.encode_tool, self.decode_tool, self.tmp = encode_tool, decode_tool, tmp
        self.models = {}
        self.counter = 0

    def name(self, stem, ext):
        self.counter += 1
        return os.path.join(self.tmp, "%s_%03d.%s" % (stem, self.counter, ext))

    def model(self, layout, dtype):
        key = (layout, dtype)
        if key not in self.models:
            path = self.name("flux2_%s_%s" % (layout, dtype), "safetensors")
            self.models[key] = (path,) + make_flux2_checkpoint(path, layout, dtype, seed=3)
        return self.models[key]

    def run(self, cmd):
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        err = p.stderr.decode("utf-8", "replace")
        return p.returncode, err


def rel_err(a, b):
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


def encode_case(c, ctx, layout, dtype, n, width, height, per_batch):
    path, enc, _, bn = ctx.model(layout, dtype)
    data = V.make_frames(n, width, height, "RGB", seed=width * 7 + n)
    frames_path = ctx.name("frames", "raw")
    with open(frames_path, "wb") as f:
        f.write(data)
    frames = V.unpack_frames(data, n, width, height, width * 3, "RGB")
    ref = encode_reference(enc, bn, frames).numpy()
    shape = (n, 128, height // CROP, width // CROP)
    c.need(ref.shape == shape, "reference shape %s, expected %s" % (ref.shape, shape))
    out = ctx.name("latents", "f32")
    rc, err = ctx.run([ctx.encode_tool, "--model", path, "--frames", frames_path, "--n", str(n), "--width",
                       str(width), "--height", str(height), "--format", "RGB", "--stride", str(width * 3),
                       "--out", out, "--precision", "fp32", "--per-batch", str(per_batch)])
    c.need(rc == 0, "encode tool exited %d: %s" % (rc, err[-2000:]))
    got = np.fromfile(out, dtype="<f4")
    c.need(got.size == ref.size, "tool wrote %d values, expected %s" % (got.size, "x".join(map(str, shape))))
    rel = rel_err(got.reshape(shape), ref)
    c.check(rel < FP32_TOL, "rel=%.3e >= %.0e" % (rel, FP32_TOL))
    return "rel=%.3e latents %s, |ref| max %.2f" % (rel, "x".join(map(str, shape)), float(np.abs(ref).max()))


def mix_seed(seed, index):
    """The engine's per-frame noise seed (torch_encoder.cpp: SplitMix64 of seed and frame index)."""
    m = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def sample_case(c, ctx, n, width, height, seed):
    """--sample: the engine draws frame i's noise eps (128 x h x w) on the CPU from mix_seed(seed, i) in the
    packed space. The reference samples the 32-channel KL latent with that noise unpacked,
    m + exp(logvar / 2) * unpack(eps), then packs and normalises it as the official encode does its mean."""
    path, enc, _, bn = ctx.model("official", "F32")
    data = V.make_frames(n, width, height, "RGB", seed=11)
    frames_path = ctx.name("frames", "raw")
    with open(frames_path, "wb") as f:
        f.write(data)
    frames = V.unpack_frames(data, n, width, height, width * 3, "RGB")
    h, w = height // CROP, width // CROP
    with torch.no_grad():
        cropped = V.crop_frames(np.asarray(frames)[..., :3], r=CROP)
        x = torch.from_numpy(np.ascontiguousarray(cropped).astype(np.float64) / 255.0) * 2.0 - 1.0
        mean, logvar = torch.chunk(V.encoder_forward(enc, x.permute(0, 3, 1, 2).contiguous()), 2, dim=1)
        eps = torch.stack([torch.randn((128, h, w), generator=torch.Generator().manual_seed(mix_seed(seed, i)),
                                       dtype=torch.float32) for i in range(n)]).to(torch.float64)
        sample = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * unpack(eps)
        ref = normalize(pack(sample), bn).numpy()
        mean_ref = normalize(pack(mean), bn).numpy()
    out = ctx.name("latents", "f32")
    rc, err = ctx.run([ctx.encode_tool, "--model", path, "--frames", frames_path, "--n", str(n), "--width",
                       str(width), "--height", str(height), "--format", "RGB", "--stride", str(width * 3),
                       "--out", out, "--precision", "fp32", "--sample", "--seed", str(seed)])
    c.need(rc == 0, "encode tool exited %d: %s" % (rc, err[-2000:]))
    got = np.fromfile(out, dtype="<f4")
    c.need(got.size == ref.size, "tool wrote %d values, expected %d" % (got.size, ref.size))
    got = got.reshape(ref.shape)
    rel = rel_err(got, ref)
    c.check(rel < FP32_TOL, "rel=%.3e >= %.0e against the sampled reference" % (rel, FP32_TOL))
    c.check(rel_err(got, mean_ref) > 1e-2, "the sample equals the mean")
    return "rel=%.3e (sample vs mean: %.2f)" % (rel, rel_err(got, mean_ref))


def decode_case(c, ctx, layout, dtype, n, h, w, per_batch):
    path, _, dec, bn = ctx.model(layout, dtype)
    g = torch.Generator().manual_seed(h * 10 + w)
    lat = torch.randn((n, 128, h, w), generator=g, dtype=torch.float64).numpy().astype(np.float32)
    lpath = ctx.name("latents", "npy")
    np.save(lpath, lat)
    ref = decode_reference(dec, bn, lat.astype(np.float64)).numpy()
    shape = (n, 3, h * 16, w * 16)
    c.need(ref.shape == shape, "reference shape %s, expected %s" % (ref.shape, shape))
    out = ctx.name("pixels", "f32")
    rc, err = ctx.run([ctx.decode_tool, "--model", path, "--latents", lpath, "--out", out, "--float",
                       "--precision", "fp32", "--per-batch", str(per_batch)])
    c.need(rc == 0, "decode tool exited %d: %s" % (rc, err[-2000:]))
    got = np.fromfile(out, dtype="<f4")
    c.need(got.size == ref.size, "tool wrote %d values, expected %s" % (got.size, "x".join(map(str, shape))))
    rel = rel_err(got.reshape(shape), ref)
    clamped = float(np.mean((ref == 0) | (ref == 1)))
    c.check(rel < FP32_TOL, "rel=%.3e >= %.0e" % (rel, FP32_TOL))
    c.check(clamped < 0.5, "%.0f %% of the reference pixels are clamped: the case checks little" % (100 * clamped))
    return "rel=%.3e pixels %s, %.0f %% clamped" % (rel, "x".join(map(str, shape)), 100 * clamped)


def cases():
    out = []
    # Odd sizes exercise the crop to 16 (offset (d mod 16) // 2 on each side).
    sizes = {"official": (64, 48), "comfy": (71, 53), "diffusers": (88, 37)}
    for layout in LAYOUTS:
        for dtype in ("F32", "F16", "BF16"):
            w, h = sizes[layout]
            out.append(("encode_%s_%s_%dx%d" % (layout, dtype.lower(), w, h),
                        lambda c, ctx, l=layout, d=dtype, w=w, h=h: encode_case(c, ctx, l, d, 3, w, h, 2)))
            out.append(("decode_%s_%s" % (layout, dtype.lower()),
                        lambda c, ctx, l=layout, d=dtype: decode_case(c, ctx, l, d, 2, 3, 4, 1)))
    out.append(("encode_official_f32_per_batch_1_of_4",
                lambda c, ctx: encode_case(c, ctx, "official", "F32", 4, 48, 32, 1)))
    out.append(("encode_official_f32_sample_seed_7", lambda c, ctx: sample_case(c, ctx, 3, 48, 32, 7)))
    out.append(("decode_comfy_f32_per_batch_5_of_3", lambda c, ctx: decode_case(c, ctx, "comfy", "F32", 3, 2, 5, 5)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("encode_tool", nargs="?")
    ap.add_argument("decode_tool", nargs="?")
    ap.add_argument("--only", action="append", default=[], help="case names (or parts of them), comma-separated")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args(argv)
    selected = cases()
    if a.only:
        parts = [p for o in a.only for p in o.split(",") if p]
        selected = [(n, f) for n, f in selected if any(p in n for p in parts)]
    if a.list:
        for n, _ in selected:
            print(n)
        return 0
    if not a.encode_tool or not a.decode_tool:
        ap.print_usage(sys.stderr)
        return 2
    selftest()
    tmp = tempfile.mkdtemp(prefix="gstvae-flux2-")
    try:
        ctx = Ctx(a.encode_tool, a.decode_tool, tmp)
        for n, f in selected:
            run_case(n, f, ctx)
    finally:
        if a.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("%d of %d cases failed" % (len(FAILED), len(RAN)))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
