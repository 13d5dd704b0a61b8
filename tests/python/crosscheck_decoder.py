#!/usr/bin/env python3
"""Cross-check the C++ KL decoder (gst-vae-decode-file) against the float64 Python reference decoder.

usage: scripts/python tests/python/crosscheck_decoder.py TOOL [--only NAME[,NAME...]] [--keep] [--list] [--timeout S]

TOOL is called as
  TOOL --model M --latents IN.npy --out OUT [--float] [--precision fp32] [--latent-format F] [--per-batch B]
and writes N x 3 x H x W float32 pixels in [0, 1] (--float: ComfyUI's clamp((x+1)/2) of the decoder output)
or N x H x W x 3 bytes (ComfyUI SaveImage's 8 bits).

Float cases pass when rel = max|a-b| / max|b| < 1e-4 against the float64 reference. Byte cases pass when
every byte equals the reference's byte, except where the reference pixel lies within 1e-4 of a rounding
boundary (then one level either way is accepted).
Prints one line per case; exit status 0 all passed, 1 some failed, 2 usage error.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vae_reference as V  # noqa: E402

FP32_TOL = 1e-4
BOUNDARY = 1e-4  # pixels (0..1) this close to a multiple of 1/255 may round either way

# Four levels (upscale 8) of small widths; level 0 (width 32) differs from the others (64), so a wrong
# up_blocks reversal fails on shapes as well as on values. The decoder has blocks + 1 = 2 per level.
FOUR_LEVEL = dict(ch=32, mult=(1, 2, 2, 2), blocks=1, z=4)


class CaseFailure(Exception):
    pass


class Ctx:
    def __init__(self, tool, tmp, timeout):
        self.tool, self.tmp, self.timeout = tool, tmp, timeout
        self._ckpts = {}
        self._counter = 0

    def name(self, stem, ext):
        self._counter += 1
        return os.path.join(self.tmp, "%s_%03d.%s" % (stem, self._counter, ext))

    def checkpoint(self, layout="ldm", dtype="F32", seed=0, **arch):
        """(path, canonical float64 decoder state as stored); a full VAE file, cached per configuration."""
        kw = dict(FOUR_LEVEL, **arch)
        key = (layout, dtype, seed, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in self._ckpts:
            path = self.name("vae_%s_%s" % (layout, dtype), "safetensors")
            _, dec = V.make_checkpoint(path, layout=layout, dtype=dtype, seed=seed, return_decoder=True, **kw)
            self._ckpts[key] = (path, dec)
        return self._ckpts[key]

    def latents(self, n, z, h, w, seed, latent_format="raw"):
        """(path of a float32 .npy, float64 latents as written): raw values ~N(0, 1), then formatted."""
        g = torch.Generator().manual_seed(seed)
        raw = torch.randn((n, z, h, w), generator=g, dtype=torch.float64)
        values = V.apply_latent_format(raw, latent_format).numpy().astype(np.float32)
        path = self.name("latents_%dx%d" % (w, h), "npy")
        np.save(path, values)
        return path, values.astype(np.float64)

    def run_tool(self, model, latents, float_output=True, precision="fp32", latent_format=None, per_batch=None,
                 expect_ok=True, memory_limit=None):
        out = self.name("out", "f32" if float_output else "rgb")
        cmd = [self.tool, "--model", model, "--latents", latents, "--out", out, "--precision", precision]
        if float_output:
            cmd.append("--float")
        if latent_format is not None:
            cmd += ["--latent-format", latent_format]
        if per_batch is not None:
            cmd += ["--per-batch", str(per_batch)]
        if memory_limit is not None:
            cmd += ["--test-memory-limit", str(memory_limit)]
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise CaseFailure("tool timed out after %ss: %s" % (self.timeout, " ".join(cmd)))
        err = p.stderr.decode("utf-8", "replace")
        if p.returncode < 0:
            raise CaseFailure("tool killed by signal %d: %s\n%s" % (-p.returncode, " ".join(cmd), err[-2000:]))
        if expect_ok and p.returncode != 0:
            raise CaseFailure("tool exited %d: %s\n%s" % (p.returncode, " ".join(cmd), err[-2000:]))
        data = None
        if p.returncode == 0 and os.path.exists(out):
            data = np.fromfile(out, dtype="<f4" if float_output else np.uint8)
        return p.returncode, err, data


def rel_err(a, b):
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


def as_shape(data, shape, what="output"):
    if data is None:
        raise CaseFailure("%s: no output file" % what)
    if data.size != int(np.prod(shape)):
        raise CaseFailure("%s has %d values, expected %s" % (what, data.size, "x".join(map(str, shape))))
    return data.reshape(shape)


def float_case(ctx, ckpt_kw, n=1, h=9, w=7, seed=1, latent_format=None, per_batch=None):
    path, state = ctx.checkpoint(**ckpt_kw)
    arch = V.infer_decoder_arch(state)
    lpath, lat = ctx.latents(n, arch["z"], h, w, seed, latent_format or "raw")
    ref, x = V.decode_reference(state, lat, latent_format or "raw")
    ref = ref.numpy()
    up = arch["upscale"]
    shape = (n, 3, h * up, w * up)
    if tuple(ref.shape) != shape:
        raise CaseFailure("reference shape %s != %s" % (ref.shape, shape))
    _, _, data = ctx.run_tool(path, lpath, latent_format=latent_format, per_batch=per_batch)
    out = as_shape(data, shape)
    if not np.all(np.isfinite(out)):
        raise CaseFailure("output holds non-finite values")
    rel = rel_err(out, ref)
    clamped = float(np.mean((ref == 0) | (ref == 1)))
    detail = "%s, decoder output in [%.2f, %.2f], %.1f%% clamped" % (
        "x".join(map(str, shape)), float(x.min()), float(x.max()), 100 * clamped)
    if not rel < FP32_TOL:
        raise CaseFailure("rel=%.3e >= %.0e (%s)" % (rel, FP32_TOL, detail))
    return rel, detail


def case_layout(layout, dtype="F32"):
    return lambda ctx: float_case(ctx, dict(layout=layout, dtype=dtype), seed=11)


def case_z16(ctx):
    # SD3 / Flux.1: 16 latent channels, no post_quant_conv.
    return float_case(ctx, dict(layout="vae", z=16, quant_conv=False), h=7, w=9, seed=12)


def case_latent_format(fmt, **arch):
    return lambda ctx: float_case(ctx, dict(arch), seed=13, latent_format=fmt)


def case_three_level(ctx):
    return float_case(ctx, dict(layout="diffusers", mult=(1, 2, 2), blocks=2), h=11, w=5, seed=14)


def case_batch(ctx):
    # 3 latents in sub-batches of 2 and 1.
    return float_case(ctx, dict(layout="ldm"), n=3, h=5, w=6, seed=15, per_batch=2)


def case_bytes(ctx):
    path, state = ctx.checkpoint(layout="diffusers")
    n, h, w = 2, 9, 7
    lpath, lat = ctx.latents(n, 4, h, w, 16)
    ref = V.decode_reference(state, lat)[0].numpy()
    ref_u8 = V.pixels_u8(ref)
    _, _, data = ctx.run_tool(path, lpath, float_output=False)
    out = as_shape(data, ref_u8.shape).astype(np.int32)
    diff = out - ref_u8.astype(np.int32)
    scaled = ref.transpose(0, 2, 3, 1) * 255.0
    near = np.abs(scaled - np.rint(scaled)) <= BOUNDARY * 255.0
    bad = (diff != 0) & ~(near & (np.abs(diff) <= 1))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise CaseFailure("%d bytes differ away from a rounding boundary, e.g. at %s: %d vs reference %d "
                          "(reference pixel %.6f)" % (int(bad.sum()), i, out[i], ref_u8[i], ref.transpose(0, 2, 3, 1)[i]))
    return None, "%d bytes, %d equal, %d off by one at a rounding boundary (%d pixels lie within %.0e of one)" % (
        diff.size, int((diff == 0).sum()), int((diff != 0).sum()), int(near.sum()), BOUNDARY)


def case_tiled(ctx):
    # A 65 x 33 latent: larger than one 64-cell tile in every pass. With forward passes limited to 2144 latent
    # cells the whole latent (2145) "runs out of memory" and is decoded tile by tile, as ComfyUI's
    # decode_tiled_ does; the reference blends the reference decoder's tiles the same way.
    path, state = ctx.checkpoint(layout="ldm", mult=(1, 2))  # upscale 2 keeps the float64 reference quick
    lpath, lat = ctx.latents(1, 4, 65, 33, 19)
    ref = V.decode_tiled_reference(state, lat)[0].numpy()
    _, err, data = ctx.run_tool(path, lpath, memory_limit=65 * 33 - 1)
    if "1 tiled" not in err:
        raise CaseFailure("the tool did not fall back to tiled decoding: %r" % err[-400:])
    out = as_shape(data, ref.shape)
    rel = rel_err(out, ref)
    untiled = V.decode_reference(state, lat)[0].numpy()
    detail = "%s; tiled vs untiled reference differ by up to %.3f" % ("x".join(map(str, ref.shape)),
                                                                     float(np.abs(ref - untiled).max()))
    if not rel < FP32_TOL:
        raise CaseFailure("rel=%.3e >= %.0e (%s)" % (rel, FP32_TOL, detail))
    return rel, detail


def case_encoder_only(ctx):
    path = ctx.name("encoder_only", "safetensors")
    V.make_checkpoint(path, include_decoder=False, **FOUR_LEVEL)
    lpath, _ = ctx.latents(1, 4, 3, 3, 17)
    rc, err, _ = ctx.run_tool(path, lpath, expect_ok=False)
    if rc == 0:
        raise CaseFailure("tool decoded with an encoder-only checkpoint")
    if "no supported VAE decoder" not in err or "decoder.conv_in.weight" not in err:
        raise CaseFailure("exit %d but the message does not say what is missing: %r" % (rc, err[-400:]))
    return None, "exit %d: %s" % (rc, err.strip().splitlines()[-1][:110])


def case_missing_tensor(ctx):
    key = "decoder.up.0.block.1.conv2.weight"
    path = ctx.name("missing", "safetensors")
    V.make_checkpoint(path, layout="diffusers", drop=(key,), **FOUR_LEVEL)
    stored = "decoder.up_blocks.3.resnets.1.conv2.weight"  # LDM up.0 is diffusers' last up block
    lpath, _ = ctx.latents(1, 4, 3, 3, 18)
    rc, err, _ = ctx.run_tool(path, lpath, expect_ok=False)
    if rc == 0:
        raise CaseFailure("tool accepted a checkpoint without %s" % key)
    if key not in err:
        raise CaseFailure("exit %d but stderr does not name %s: %r" % (rc, key, err[-400:]))
    return None, "exit %d, names %s (stored as %s)" % (rc, key, stored)


CASES = [
    ("ldm", case_layout("ldm")),
    ("first_stage_model", case_layout("first_stage_model")),
    ("vae_prefix", case_layout("vae")),
    ("diffusers", case_layout("diffusers")),
    ("diffusers_old", case_layout("diffusers_old")),
    ("f16_weights", case_layout("ldm", "F16")),
    ("bf16_weights_diffusers", case_layout("diffusers", "BF16")),
    ("z16_no_post_quant_conv", case_z16),
    ("latent_sdxl", case_latent_format("sdxl")),
    ("latent_sd3_z16", case_latent_format("sd3", z=16, quant_conv=False)),
    ("three_level", case_three_level),
    ("batch_3_per_2", case_batch),
    ("bytes_8bit", case_bytes),
    ("tiled_65x33", case_tiled),
    ("neg_encoder_only", case_encoder_only),
    ("neg_missing_tensor", case_missing_tensor),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description="cross-check the C++ decoder tool against the Python reference")
    ap.add_argument("tool", nargs="?")
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args(argv)
    names = [n for n, _ in CASES]
    if a.list:
        print("\n".join(names))
        return 0
    if not a.tool or not (os.path.isfile(a.tool) and os.access(a.tool, os.X_OK)):
        print("crosscheck_decoder: error: tool not found or not executable: %s" % a.tool, file=sys.stderr)
        return 2
    only = [s for o in a.only for s in o.split(",") if s]
    unknown = [o for o in only if o not in names]
    if unknown:
        print("crosscheck_decoder: error: unknown case(s) %s; known: %s" % (", ".join(unknown), ", ".join(names)),
              file=sys.stderr)
        return 2
    selected = [(n, f) for n, f in CASES if not only or n in only]
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tmp = tempfile.mkdtemp(prefix="vaedecode-crosscheck-")
    ctx = Ctx(os.path.abspath(a.tool), tmp, a.timeout)
    failed = []
    t_all = time.time()
    try:
        for name, fn in selected:
            t0 = time.time()
            try:
                rel, detail = fn(ctx)
                rel_s = "rel=%.3e (< %.0e)" % (rel, FP32_TOL) if rel is not None else "rel=n/a"
                print("PASS %-24s %-24s %s [%.1fs]" % (name, rel_s, detail, time.time() - t0), flush=True)
            except CaseFailure as e:
                failed.append(name)
                print("FAIL %-24s %s [%.1fs]" % (name, e, time.time() - t0), flush=True)
            except Exception as e:  # a bug in the harness or the reference is still a failure
                failed.append(name)
                print("FAIL %-24s harness error: %s: %s [%.1fs]" % (name, type(e).__name__, e, time.time() - t0),
                      flush=True)
                traceback.print_exc(file=sys.stderr)
    finally:
        if a.keep:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("%d/%d cases passed in %.1fs%s" % (len(selected) - len(failed), len(selected), time.time() - t_all,
                                             (": failed " + ", ".join(failed)) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
