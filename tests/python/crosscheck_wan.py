#!/usr/bin/env python3
"""Cross-check the engine's Wan 2.1 / Wan 2.2 video VAE encoders against the float64 reference (wan_reference.py).

usage: scripts/python tests/python/crosscheck_wan.py ENCODE_TOOL [--only NAME[,NAME...]] [--keep] [--list]

ENCODE_TOOL is gst-vae-encode-file, run in fp32 on the CPU:
  ENCODE_TOOL --model M --frames F --n N --width W --height H --format RGB --per-batch B --out OUT.f32
              [--latent-format raw|wan21] --precision fp32 --device cpu --threads 2
For a video model the N frames are one stream (one clip), fed B at a time; the tool writes every latent the
stream gives, in order, as float32 T_lat x z x h x w with T_lat = 1 + (N-1) div 4 (trailing frames past the last
complete group of 4 are dropped, as by every reference).  The expected latents are therefore the whole-clip
encode of the N frames whatever B is.

Weights are random (wan_weights.py) in every layout (official, comfy 'vae.', diffusers) and dtype (F32, F16,
BF16: the reference uses the stored, rounded values upcast to float64), some with decoder tensors the loader
must ignore.  Frames are pans over the photos of shared/media (or $GSTVAE_SHARED_DIR/media), or smooth random
fields.  Pass: rel = max|a-b| / max|b| <= 1e-4 and the exact latent count and shape.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import casekit  # noqa: E402
import vae_reference as V  # noqa: E402
import wan_reference as R  # noqa: E402
import wan_weights as W  # noqa: E402

SHARED = os.environ.get("GSTVAE_SHARED_DIR") or os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared"))
MEDIA = os.path.join(SHARED, "media")
PHOTOS = {"chelsea": (448, 296), "coffee": (384, 256), "astronaut": (512, 512)}
TOL = 1e-4
THREADS = "2"


def rel_err(a, b):
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


# ------------------------------------------------------------------------------------------ frames

def pan_clip(photo, n, width, height, shrink=4, step=(3, 2)):
    """n uint8 frames width x height: a window moving `step` pixels a frame over the photo shrunk `shrink` times
    (box average), so small frames still hold a recognisable, smooth-ish image."""
    pw, ph = PHOTOS[photo]
    img = np.fromfile(os.path.join(MEDIA, "%s-%dx%d.rgb" % (photo, pw, ph)), dtype=np.uint8).reshape(ph, pw, 3)
    img = img[:ph - ph % shrink, :pw - pw % shrink].astype(np.float64)
    img = img.reshape(ph // shrink, shrink, pw // shrink, shrink, 3).mean(axis=(1, 3))
    img = np.rint(img).astype(np.uint8)
    sh, sw = img.shape[:2]
    if width > sw or height > sh:
        raise ValueError("%s shrunk x%d is %dx%d, smaller than %dx%d" % (photo, shrink, sw, sh, width, height))
    frames = []
    for i in range(n):
        x = (i * step[0]) % (sw - width + 1)
        y = (i * step[1]) % (sh - height + 1)
        frames.append(img[y:y + height, x:x + width])
    return np.ascontiguousarray(np.stack(frames))


def random_clip(n, width, height, seed):
    """Smooth colour fields plus noise (vae_reference.make_frames), uint8 n x H x W x 3."""
    return V.unpack_frames(V.make_frames(n, width, height, "RGB", seed=seed), n, width, height, None, "RGB")


# ------------------------------------------------------------------------------------------ engine

class Ctx:
    def __init__(self, tool, tmp):
        self.tool, self.tmp, self.counter = tool, tmp, 0

    def path(self, name):
        self.counter += 1
        return os.path.join(self.tmp, "%03d_%s" % (self.counter, name))

    def encode(self, c, model, frames, per_batch, extra=()):
        """float32 array written by the tool (or a failed check)."""
        n, h, w, _ = frames.shape
        src = self.path("frames.rgb")
        frames.tofile(src)
        out = self.path("latents.f32")
        cmd = [self.tool, "--model", model, "--frames", src, "--n", str(n), "--width", str(w), "--height", str(h),
               "--format", "RGB", "--per-batch", str(per_batch), "--out", out, "--precision", "fp32",
               "--device", "cpu", "--threads", THREADS] + list(extra)
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        err = p.stderr.decode("utf-8", "replace")
        c.need(p.returncode == 0, "exit %d: %s\n%s" % (p.returncode, " ".join(cmd), err[-2000:]))
        c.need(os.path.exists(out), "no output file %s" % out)
        return np.fromfile(out, dtype="<f4")


def check_case(c, ctx, variant, frames, per_batch, dim=8, z=None, layout="official", dtype="F32", stub=False,
               latent_format=None, seed=1):
    """Writes random weights, runs the tool, compares with the whole-clip reference; returns the note."""
    state = W.make_state(variant, dim, z, seed=seed)
    model = ctx.path("wan%s_%s_%s.safetensors" % (variant, layout, dtype))
    stored = W.write_checkpoint(model, state, variant, layout, dtype, with_decoder_stub=stub, seed=seed)
    loaded, info = W.load_wan_state(model)
    c.need(info["variant"] == variant and all(torch.equal(loaded[k], stored[k]) for k in stored),
           "wan_weights: the file does not load back to the stored weights")
    t0 = time.monotonic()
    ref = R.encode_frames(stored, frames)
    t_ref = time.monotonic() - t0
    n, h, w, _ = frames.shape
    zz = int(stored["conv1.weight"].shape[0]) // 2
    c.need(ref.shape == R.latent_shape(variant, n, h, w, zz), "reference shape %s" % (ref.shape,))
    extra = []
    if latent_format is not None:
        ref = R.normalise(ref, variant)
        extra = ["--latent-format", latent_format]
    t0 = time.monotonic()
    got = ctx.encode(c, model, frames, per_batch, extra)
    t_tool = time.monotonic() - t0
    shape = "x".join(map(str, ref.shape))
    c.need(got.size == ref.size, "tool wrote %d floats, expected %d (%s = T_lat x z x h x w)%s"
           % (got.size, ref.size, shape, (", i.e. %.3g latent frames" % (got.size / ref[0].size)) if ref[0].size else ""))
    got = got.reshape(ref.shape)
    rel = rel_err(got, ref)
    per_frame = [rel_err(got[i], ref[i]) for i in range(ref.shape[0])]
    c.need(np.isfinite(got).all(), "non-finite values in the tool's output")
    c.need(rel <= TOL, "rel=%.3e > %.0e (per latent frame: %s)" % (rel, TOL, " ".join("%.1e" % r for r in per_frame)))
    return "rel=%.3e (<= %.0e) latents %s from %d frames of %dx%d, per-batch %d, Wan %s %s %s%s, |ref| max %.2f " \
           "[ref %.1fs, tool %.1fs]" % (rel, TOL, shape, n, w, h, per_batch, variant, layout, dtype,
                                        ", +decoder" if stub else "", float(np.abs(ref).max()), t_ref, t_tool)


# ------------------------------------------------------------------------------------------ cases
# Wan 2.1: dim 8 (widths 8, 16, 32, 32), z 16; Wan 2.2: dim 8, z 48 or small.

def case(variant, frames_fn, per_batch, **kw):
    def run(c, ctx):
        return check_case(c, ctx, variant, frames_fn(), per_batch, **kw)
    return run


CASES = [
    # Clip lengths 1, 5, 13, 16 and per-batch 1, 2, 5, 16 (each value covered; 16 frames drop 3).
    ("w21_t1_b1_official_f32", case("2.1", lambda: pan_clip("chelsea", 1, 40, 24), 1)),
    ("w21_t5_b2_comfy_f16", case("2.1", lambda: pan_clip("coffee", 5, 40, 24), 2, layout="comfy", dtype="F16")),
    ("w21_t13_b5_diffusers_bf16_stub", case("2.1", lambda: pan_clip("astronaut", 13, 40, 24), 5,
                                            layout="diffusers", dtype="BF16", stub=True)),
    ("w21_t16_b16_official_f32_drop3", case("2.1", lambda: pan_clip("chelsea", 16, 48, 32), 16, seed=2)),
    ("w21_t13_b1_comfy_bf16_stub", case("2.1", lambda: random_clip(13, 40, 24, seed=5), 1, layout="comfy",
                                        dtype="BF16", stub=True, seed=3)),
    ("w21_t16_b5_diffusers_f32", case("2.1", lambda: pan_clip("coffee", 16, 40, 24), 5, layout="diffusers", seed=4)),
    # Odd sizes: 37x29 -> 32x24 from offset (2, 2).
    ("w21_odd_37x29_t5_b2_official_f16", case("2.1", lambda: pan_clip("chelsea", 5, 37, 29), 2, dtype="F16", seed=6)),
    # Normalised latents (Wan 2.1's 16 means and stds).
    ("w21_latent_format_wan21_t5_b5", case("2.1", lambda: pan_clip("astronaut", 5, 40, 24), 5,
                                           latent_format="wan21", seed=7)),
    # Full Wan 2.1 width (dim 96, widths 96/192/384/384, z 16), small frames.
    ("w21_dim96_z16_t5_b5_official_f32", case("2.1", lambda: pan_clip("coffee", 5, 16, 16), 5, dim=96, seed=8)),
    # Wan 2.2 (patchify, AvgDown3D shortcuts; crop to multiples of 16).
    ("w22_t1_b1_official_f32_z48", case("2.2", lambda: pan_clip("astronaut", 1, 48, 32), 1, seed=9)),
    ("w22_t5_b2_comfy_f16_z48", case("2.2", lambda: pan_clip("chelsea", 5, 48, 32), 2, layout="comfy", dtype="F16",
                                     seed=10)),
    ("w22_t13_b5_diffusers_bf16_stub", case("2.2", lambda: pan_clip("coffee", 13, 48, 32), 5, z=8,
                                            layout="diffusers", dtype="BF16", stub=True, seed=11)),
    ("w22_t16_b16_official_f32_drop3", case("2.2", lambda: random_clip(16, 48, 32, seed=12), 16, z=8, seed=13)),
    ("w22_odd_53x37_t5_b1_diffusers_f32", case("2.2", lambda: pan_clip("astronaut", 5, 53, 37), 1, z=8,
                                               layout="diffusers", seed=14)),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("encode_tool", nargs="?")
    ap.add_argument("--only", action="append", default=[], help="case names (or parts of them), comma-separated")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(n for n, _ in CASES))
        return 0
    if not a.encode_tool:
        ap.print_usage(sys.stderr)
        return 2
    if not os.path.isdir(MEDIA):
        print("FAIL: no %s (set GSTVAE_SHARED_DIR)" % MEDIA)
        return 1
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return casekit.run_in_tempdir(CASES, a.only, "wan-crosscheck-", lambda tmp: Ctx(os.path.abspath(a.encode_tool), tmp),
                                  a.keep)

if __name__ == "__main__":
    sys.exit(main())
