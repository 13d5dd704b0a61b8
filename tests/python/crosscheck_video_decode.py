#!/usr/bin/env python3
"""Cross-check the engine's video VAE decoders (Wan 2.1, Wan 2.2, TAEHV taew2_1 / taew2_2) against the float64
references (wan_reference.py, taehv_reference.py).

usage: scripts/python tests/python/crosscheck_video_decode.py DECODE_TOOL [--only NAME[,NAME...]] [--keep] [--list]
       scripts/python tests/python/crosscheck_video_decode.py --reference-only    (the references and the plumbing alone)

DECODE_TOOL is gst-vae-decode-file, run in fp32 on the CPU:
  DECODE_TOOL --model M --latents IN.npy --out OUT.f32 --float --precision fp32 --device cpu --threads 2
              --per-batch B [--latent-format raw|wan21|wan22] [--images]
IN.npy is float32 T x C x h x w, one clip; a temporal decoder decodes it as one stream, B latents per call, and
writes F x 3 x H x W float32 in [0, 1] with F = 1 + 4 (T - 1) (Wan: ComfyUI's clamp((x + 1) / 2, 0, 1) of the
decoder output; TAEHV: its [0, 1] output, clamped; 4T - 3 frames after upstream's 3 dropped ones, the same
count).  With --images each latent is its own clip (F = T).  The expected pixels are the reference's decode of
the whole clip whatever B is (wan_reference's self-test shows one latent per call, the official schedule,
equals any schedule that sends latent 0 alone first; taehv_reference's that any schedule is exact).

Where each rule comes from: the Wan decoders from the official code (Wan-Video/Wan2.1 wan/modules/vae.py
Decoder3d and WanVAE_.decode; Wan-Video/Wan2.2 wan/modules/vae2_2.py), TAEHV from madebyollin/taehv taehv.py
(decoder Sequential, decode_video), as written down in the two reference modules.

Weights are random (wan_weights.make_state(..., decoder_dim=...), taehv_reference.make_decoder_state) in
every layout (Wan: official, comfy 'vae.', diffusers; TAEHV: its one layout, a whole encoder + decoder file)
and dtype (F32, F16, BF16: the reference uses the stored, rounded values upcast to float64).  Latents are
smooth random fields ~N(0, 1) in the model's normalised space, written raw ((x * std + mean), the tool's
default) or, with --latent-format wan21|wan22, as they are.  The weights keep the outputs mostly unsaturated:
each case requires > 50 % of the reference pixels strictly inside (0, 1), else the clamp could hide errors.
Pass: rel = max|a-b| / max|b| <= 1e-4 (crosscheck_wan.rel_err) and the exact frame count and shape.
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
import taehv_reference as TR  # noqa: E402
import wan_reference as R  # noqa: E402
import wan_weights as W  # noqa: E402
from crosscheck_wan import THREADS, TOL, rel_err  # noqa: E402

MIN_UNSATURATED = 0.5
TAEHV_ENCODER_WIDTH = {"taew2_1": 16, "taew2_2": 12, "taehv1_5": 8, "lighttaehy1_5": 8, "taeltx_2": 8,
                       "taeltx2_3": 8}  # as crosscheck_taehv.py
TAEHV_FORMAT = {"taew2_1": "wan21", "taew2_2": "wan22"}
WAN_FORMAT = {"2.1": "wan21", "2.2": "wan22"}


def smooth_latents(t, z, h, w, seed):
    """T x z x h x w float64, ~N(0, 1) per channel: a smooth field (low-frequency sines drifting over time)
    plus noise, as normalised latents look."""
    g = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.empty((t, z, h, w))
    for c in range(z):
        fy, fx, ft = g.uniform(0.2, 1.0, size=3)
        py, px = g.uniform(0, 2 * np.pi, size=2)
        for i in range(t):
            out[i, c] = np.sin(fy * yy + py + ft * i) * np.cos(fx * xx + px - 0.5 * ft * i)
    out = out / max(out.std(), 1e-6) * 0.8 + g.normal(0, 0.6, size=out.shape)
    return out


# ------------------------------------------------------------------------------------------ engine

class Ctx:
    def __init__(self, tool, tmp, reference_only):
        self.tool, self.tmp, self.reference_only, self.counter = tool, tmp, reference_only, 0

    def path(self, stem, ext):
        """A fresh file name that starts with `stem` (TAEHV files keep their variant's name first)."""
        self.counter += 1
        return os.path.join(self.tmp, "%s_%03d.%s" % (stem, self.counter, ext))

    def decode(self, c, model, latents32, per_batch, extra=()):
        """float32 array written by the tool, None with --reference-only (or a failed check)."""
        src = self.path("latents", "npy")
        np.save(src, latents32)
        if self.reference_only:
            c.need(np.array_equal(np.load(src), latents32), "the .npy does not read back")
            return None
        out = self.path("pixels", "f32")
        cmd = [self.tool, "--model", model, "--latents", src, "--out", out, "--float", "--precision", "fp32",
               "--device", "cpu", "--threads", THREADS, "--per-batch", str(per_batch)] + list(extra)
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        err = p.stderr.decode("utf-8", "replace")
        c.need(p.returncode == 0, "exit %d: %s\n%s" % (p.returncode, " ".join(cmd), err[-2000:]))
        c.need(os.path.exists(out), "no output file %s" % out)
        return np.fromfile(out, dtype="<f4")


def compare(c, ctx, model, file_latents, ref, per_batch, extra, what, t_ref):
    """Runs the tool on the float32 latents, compares with the reference pixels F x 3 x H x W; the note."""
    unsat = float(((ref > 0) & (ref < 1)).mean())
    c.need(unsat > MIN_UNSATURATED, "test design: only %.1f %% of the reference pixels inside (0, 1)" % (100 * unsat))
    t0 = time.monotonic()
    got = ctx.decode(c, model, file_latents, per_batch, extra)
    t_tool = time.monotonic() - t0
    shape = "x".join(map(str, ref.shape))
    base = "%s frames %s (F x 3 x H x W) from %s latents, per-batch %d%s, %.0f %% unsaturated" \
        % (what, shape, "x".join(map(str, file_latents.shape)), per_batch,
           (" " + " ".join(extra)) if extra else "", 100 * unsat)
    if got is None:
        return "reference only: %s [ref %.1fs]" % (base, t_ref)
    frame = ref[0].size
    c.need(got.size == ref.size, "tool wrote %d floats, expected %d (%s), i.e. %.3g frames instead of %d"
           % (got.size, ref.size, shape, got.size / frame, ref.shape[0]))
    got = got.reshape(ref.shape)
    c.need(np.isfinite(got).all(), "non-finite values in the tool's output")
    rel = rel_err(got, ref)
    per_frame = [rel_err(got[i], ref[i]) for i in range(ref.shape[0])]
    c.need(rel <= TOL, "rel=%.3e > %.0e (per frame: %s)" % (rel, TOL, " ".join("%.1e" % r for r in per_frame)))
    return "rel=%.3e (<= %.0e) %s [ref %.1fs, tool %.1fs]" % (rel, TOL, base, t_ref, t_tool)


# ------------------------------------------------------------------------------------------ Wan

def check_wan(c, ctx, variant, t, h, w, per_batch, dim=8, enc_dim=None, layout="official", dtype="F32",
              latent_format=False, images=False, seed=1):
    """dim: the decoder's width; enc_dim: the encoder's (default dim; real Wan 2.2 has 160 vs 256)."""
    z = W.DEFAULT_Z[variant]
    state = W.make_state(variant, enc_dim or dim, z, seed=seed, decoder_dim=dim)
    model = ctx.path("wan%s_%s_%s" % (variant, layout, dtype), "safetensors")
    stored = W.write_checkpoint(model, state, variant, layout, dtype)
    loaded, info = W.load_wan_state(model, decoder=True)
    c.need(info["variant"] == variant and info["decoder_dim"] == dim and set(loaded) == set(stored)
           and all(torch.equal(loaded[k], stored[k]) for k in stored),
           "wan_weights: the file does not load back to the stored weights")
    norm = smooth_latents(t, z, h, w, seed + 100)
    extra = []
    if latent_format:
        file_latents = norm.astype(np.float32)
        ref_in = R.denormalise(file_latents.astype(np.float64), variant)
        extra = ["--latent-format", WAN_FORMAT[variant]]
    else:
        file_latents = R.denormalise(norm, variant).astype(np.float32)
        ref_in = file_latents.astype(np.float64)
    if images:
        extra.append("--images")
    t0 = time.monotonic()
    ref = R.decode_latents(stored, ref_in, images=images)
    t_ref = time.monotonic() - t0
    m = R.SPATIAL[variant]
    frames = t if images else R.decoded_frames(t)
    c.need(ref.shape == (frames, 3, h * m, w * m), "reference shape %s" % (ref.shape,))
    what = "Wan %s decoder dim %d%s %s %s," % (variant, dim, " (encoder %d)" % enc_dim if enc_dim else "", layout,
                                                dtype)
    return compare(c, ctx, model, file_latents, ref, per_batch, extra, what, t_ref)


# ------------------------------------------------------------------------------------------ TAEHV

def check_taehv(c, ctx, variant, t, h, w, per_batch, dtype="F32", latent_format=False, images=False,
                widths=(32, 16, 8, 8), seed=1, super_=False):
    """super_: the decoder in the super layout, the file named <variant>_super_... as upstream's."""
    patch, z, _, _ = TR.VARIANTS[variant]
    enc = TR.make_state(variant, TAEHV_ENCODER_WIDTH[variant], seed=seed)
    dec = TR.make_decoder_state(variant, widths, seed=seed, super_=super_)
    # the name starts with the variant's: it says which where two files share the shapes
    model = ctx.path("%s%s_%s" % (variant, "_super" if super_ else "", dtype), "safetensors")
    _, stored = TR.write_model(model, enc, dec, dtype)
    loaded = TR.load_decoder(model)
    c.need(set(loaded) == set(stored) and all(torch.equal(loaded[k], stored[k]) for k in stored)
           and TR.is_super(loaded) == super_, "taehv_reference: the file does not load back")
    norm = torch.from_numpy(smooth_latents(t, z, h, w, seed + 200))
    extra = []
    if latent_format:
        file_latents = norm.numpy().astype(np.float32)
        ref_in = torch.from_numpy(file_latents.astype(np.float64))
        extra = ["--latent-format", TAEHV_FORMAT[variant]]
    else:
        file_latents = TR.to_raw(norm, variant).numpy().astype(np.float32)
        ref_in = TR.from_raw(torch.from_numpy(file_latents.astype(np.float64)), variant)
    if images:
        extra.append("--images")
    t0 = time.monotonic()
    with torch.no_grad():
        if images:
            ref = torch.cat([TR.decode_video(stored, ref_in[i:i + 1], variant=variant) for i in range(t)])
        else:
            ref = TR.decode_video(stored, ref_in, variant=variant)
    ref = ref.numpy()
    t_ref = time.monotonic() - t0
    d = 8 * patch
    frames = t if images else TR.decoded_frames(t, variant)
    c.need(ref.shape == (frames, 3, h * d, w * d), "reference shape %s" % (ref.shape,))
    what = "%s%s widths %s %s," % (variant, " super" if super_ else "", ",".join(map(str, widths)), dtype)
    return compare(c, ctx, model, file_latents, ref, per_batch, extra, what, t_ref)


# ------------------------------------------------------------------------------------------ cases

def wan(variant, t, h, w, per_batch, **kw):
    return lambda c, ctx: check_wan(c, ctx, variant, t, h, w, per_batch, **kw)


def taehv(variant, t, h, w, per_batch, **kw):
    return lambda c, ctx: check_taehv(c, ctx, variant, t, h, w, per_batch, **kw)


CASES = [
    # Wan 2.1 (dim 8: decoder widths 32, 32, 32, 16, 8; z 16): T = 1, 2, 3, 5 and per-batch 1, 2, 5, 16 over
    # every layout and dtype; odd latent sizes; normalised latents; images.
    ("w21_t1_b1_official_f32", wan("2.1", 1, 4, 6, 1)),
    ("w21_t2_b2_comfy_f16", wan("2.1", 2, 4, 6, 2, layout="comfy", dtype="F16", seed=2)),
    ("w21_t3_b5_diffusers_bf16", wan("2.1", 3, 4, 6, 5, layout="diffusers", dtype="BF16", seed=3)),
    ("w21_t5_b16_official_f32", wan("2.1", 5, 4, 6, 16, seed=4)),
    ("w21_t5_b1_comfy_bf16_odd_3x5", wan("2.1", 5, 3, 5, 1, layout="comfy", dtype="BF16", seed=5)),
    ("w21_t5_b2_diffusers_f32_odd_5x3", wan("2.1", 5, 5, 3, 2, layout="diffusers", seed=6)),
    ("w21_t5_b5_official_f16", wan("2.1", 5, 3, 4, 5, dtype="F16", seed=7)),
    ("w21_latent_format_wan21_t3_b2_comfy", wan("2.1", 3, 4, 6, 2, layout="comfy", latent_format=True, seed=8)),
    ("w21_images_t3_b2_official", wan("2.1", 3, 3, 5, 2, images=True, seed=9)),
    # Real Wan 2.1 widths (dim 96: 384, 384, 384, 192, 96; attention over 384 channels), tiny latents.
    ("w21_dim96_t2_b2_official_f32", wan("2.1", 2, 2, 3, 2, dim=96, enc_dim=4, seed=10)),
    # Wan 2.2 (dim 8, z 48; 16x spatial, Up_ResidualBlocks with DupUp3D shortcuts, unpatchify); some with a
    # narrower encoder, as the real file (encoder 160, decoder 256).
    ("w22_t1_b1_official_f32", wan("2.2", 1, 3, 4, 1, seed=11)),
    ("w22_t2_b2_comfy_bf16_odd_3x5", wan("2.2", 2, 3, 5, 2, layout="comfy", dtype="BF16", seed=12)),
    ("w22_t3_b5_diffusers_f16_odd_5x3", wan("2.2", 3, 5, 3, 5, enc_dim=4, layout="diffusers", dtype="F16",
                                            seed=13)),
    ("w22_t5_b16_official_f32", wan("2.2", 5, 3, 5, 16, enc_dim=4, seed=14)),
    ("w22_t5_b1_diffusers_f32", wan("2.2", 5, 2, 3, 1, layout="diffusers", seed=15)),
    ("w22_latent_format_wan22_t3_b2_official", wan("2.2", 3, 3, 4, 2, latent_format=True, seed=16)),
    ("w22_images_t2_b1_diffusers", wan("2.2", 2, 3, 4, 1, layout="diffusers", images=True, seed=17)),
    # TAEHV (decoder widths 32, 16, 8, 8; one file with the encoder): taew2_1 (16 channels, 8x) and taew2_2
    # (48 channels, 16x through pixel_shuffle(2)).
    ("taew21_t1_b1_f32", taehv("taew2_1", 1, 4, 6, 1, seed=21)),
    ("taew21_t5_b2_f16_odd_3x5", taehv("taew2_1", 5, 3, 5, 2, dtype="F16", seed=22)),
    ("taew21_t3_b16_bf16", taehv("taew2_1", 3, 4, 6, 16, dtype="BF16", seed=23)),
    ("taew21_latent_format_wan21_t5_b5", taehv("taew2_1", 5, 4, 6, 5, latent_format=True, seed=24)),
    ("taew21_images_t3_b2", taehv("taew2_1", 3, 3, 5, 2, images=True, seed=25)),
    ("taew21_real_widths_t2_b1", taehv("taew2_1", 2, 2, 3, 1, widths=(256, 128, 64, 64), seed=26)),
    ("taew22_t1_b1_f32", taehv("taew2_2", 1, 3, 5, 1, seed=27)),
    ("taew22_t5_b2_bf16_odd_5x3", taehv("taew2_2", 5, 5, 3, 2, dtype="BF16", seed=28)),
    ("taew22_latent_format_wan22_t3_b5_f16", taehv("taew2_2", 3, 3, 4, 5, dtype="F16", latent_format=True, seed=29)),
    ("taew22_images_t2_b16", taehv("taew2_2", 2, 3, 4, 16, images=True, seed=30)),
    # The newer files: taehv1_5 (raw x 1.03682 in), lighttaehy1_5 (LeakyReLU, [-1, 1] out; the same shapes,
    # told apart by the name), taeltx_2 / taeltx2_3 (128 channels, 32x through pixel_shuffle(4), 8 frames per
    # latent, 7 trimmed), the super decoders (widths 16, 8, 8, 8; once at the real 512, 256, 128, 64).
    ("taehv15_t3_b2_f32", taehv("taehv1_5", 3, 3, 4, 2, widths=(16, 8, 8, 8), seed=31)),
    ("taehv15_t2_b1_bf16", taehv("taehv1_5", 2, 3, 3, 1, widths=(16, 8, 8, 8), dtype="BF16", seed=32)),
    ("lighttaehy15_t3_b1_f32", taehv("lighttaehy1_5", 3, 3, 4, 1, widths=(16, 8, 8, 8), seed=33)),
    ("lighttaehy15_images_t2_b2", taehv("lighttaehy1_5", 2, 2, 3, 2, widths=(16, 8, 8, 8), images=True, seed=34)),
    ("taeltx2_t3_b2_f32", taehv("taeltx_2", 3, 2, 3, 2, widths=(16, 8, 8, 8), seed=35)),
    ("taeltx23_t2_b1_f16", taehv("taeltx2_3", 2, 3, 2, 1, widths=(16, 8, 8, 8), dtype="F16", seed=36)),
    ("taeltx23_images_t2_b16", taehv("taeltx2_3", 2, 2, 2, 16, widths=(16, 8, 8, 8), images=True, seed=37)),
    ("taew22_super_t3_b2_f32", taehv("taew2_2", 3, 3, 4, 2, widths=(16, 8, 8, 8), super_=True, seed=38)),
    ("taehv15_super_t2_b1_bf16", taehv("taehv1_5", 2, 3, 3, 1, widths=(16, 8, 8, 8), dtype="BF16", super_=True,
                                       seed=39)),
    ("taehv15_super_images_t2_b2", taehv("taehv1_5", 2, 2, 3, 2, widths=(16, 8, 8, 8), images=True, super_=True,
                                         seed=40)),
    ("taew22_super_real_widths_t2_b1", taehv("taew2_2", 2, 1, 2, 1, widths=(512, 256, 128, 64), super_=True,
                                             seed=41)),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("decode_tool", nargs="?")
    ap.add_argument("--only", action="append", default=[], help="case names (or parts of them), comma-separated")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--reference-only", action="store_true", help="run the references and checks, not the tool")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(n for n, _ in CASES))
        return 0
    if not a.decode_tool and not a.reference_only:
        ap.print_usage(sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tool = os.path.abspath(a.decode_tool) if a.decode_tool else None
    return casekit.run_in_tempdir(CASES, a.only, "video-decode-crosscheck-",
                                  lambda tmp: Ctx(tool, tmp, a.reference_only), a.keep)

if __name__ == "__main__":
    sys.exit(main())
