#!/usr/bin/env python3
"""Cross-check the engine's TAESD family against the float64 Python reference (taesd_reference.py).

usage: scripts/python tests/python/crosscheck_taesd.py ENCODE_TOOL DECODE_TOOL [--only NAME[,NAME...]] [--keep] [--list]

ENCODE_TOOL is gst-vae-encode-file, DECODE_TOOL gst-vae-decode-file, both run in fp32 on the CPU.
Encoders: the raw latents (the model's output / scale + shift, as ComfyUI's TAESD VAE gives them) must agree
with the reference to a relative error rel = max|a-b| / max|b| <= 1e-4.
Decoders: the tool's 8-bit frames must equal the reference's 8-bit frames (ComfyUI's clamp, x255, truncate),
except for values whose reference lies within 1e-4 (in [0, 1] units) of a truncation boundary, and those may
differ by one level only.
Models and photos come from ../shared beside the repository (or $GSTVAE_SHARED_DIR); a failure if absent.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import taesd_reference as T  # noqa: E402
import vae_reference as V  # noqa: E402

SHARED = os.environ.get("GSTVAE_SHARED_DIR") or os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared"))
MODELS = os.path.join(SHARED, "models")
MEDIA = os.path.join(SHARED, "media")

TOL = 1e-4
BOUNDARY = 1e-4
FAMILIES = ("taesd", "taesdxl", "taesd3", "taef1", "taef2")


class CaseFailure(Exception):
    pass


def rel_err(a, b):
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


def photo(name, w, h):
    """uint8 1 x H x W x 3 of a photo in shared/media."""
    return np.fromfile(os.path.join(MEDIA, "%s-%dx%d.rgb" % (name, w, h)), dtype=np.uint8).reshape(1, h, w, 3)


def centre(rgb, w, h):
    H, W = rgb.shape[1:3]
    y, x = (H - h) // 2, (W - w) // 2
    return np.ascontiguousarray(rgb[:, y:y + h, x:x + w])


class Ctx:
    def __init__(self, encode_tool, decode_tool, tmp):
        self.encode_tool, self.decode_tool, self.tmp = encode_tool, decode_tool, tmp
        self.counter = 0

    def path(self, name):
        self.counter += 1
        return os.path.join(self.tmp, "%03d_%s" % (self.counter, name))

    def run(self, cmd, expect_ok=True):
        p = subprocess.run(cmd + ["--precision", "fp32", "--device", "cpu"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=300)
        err = p.stderr.decode("utf-8", "replace")
        if p.returncode < 0:
            raise CaseFailure("killed by signal %d: %s\n%s" % (-p.returncode, " ".join(cmd), err[-2000:]))
        if expect_ok and p.returncode != 0:
            raise CaseFailure("exit %d: %s\n%s" % (p.returncode, " ".join(cmd), err[-2000:]))
        return p.returncode, err

    def encode(self, model, rgb, extra=(), expect_ok=True):
        """Runs the encode tool on uint8 N x H x W x 3 frames; returns (rc, stderr, float32 array or None)."""
        n, h, w, _ = rgb.shape
        frames = self.path("frames.rgb")
        rgb.tofile(frames)
        out = self.path("latents.f32")
        rc, err = self.run([self.encode_tool, "--model", model, "--frames", frames, "--n", str(n), "--width", str(w),
                            "--height", str(h), "--format", "RGB", "--out", out] + list(extra), expect_ok)
        data = np.fromfile(out, dtype="<f4") if rc == 0 and os.path.exists(out) else None
        return rc, err, data

    def decode(self, model, latents, extra=(), expect_ok=True):
        """Runs the decode tool on float32 N x C x h x w latents; returns (rc, stderr, uint8 N x H x W x 3)."""
        src = self.path("latents.npy")
        np.save(src, np.ascontiguousarray(latents, dtype="<f4"))
        out = self.path("frames.rgb")
        rc, err = self.run([self.decode_tool, "--model", model, "--latents", src, "--out", out] + list(extra),
                           expect_ok)
        data = None
        if rc == 0:
            n, _, h, w = latents.shape
            data = np.fromfile(out, dtype=np.uint8)
            if data.size != n * h * 8 * w * 8 * 3:
                raise CaseFailure("decoded %d bytes, expected %d" % (data.size, n * h * 8 * w * 8 * 3))
            data = data.reshape(n, h * 8, w * 8, 3)
        return rc, err, data


# ------------------------------------------------------------------------------------------- checks

def check_encoder(ctx, model, state, family, rgb, extra=(), latent_format=None, multiple=8):
    """Tool latents vs reference: raw = out / scale + shift (or the given latent format of it)."""
    cropped = T.crop(rgb, multiple)
    with torch.no_grad():
        out = T.encoder_forward(state, T.frames_to_input(cropped))
    ref = T.to_raw(out, family)
    if latent_format is not None:
        ref = torch.from_numpy(np.asarray(V.apply_latent_format(ref, latent_format)))
        extra = list(extra) + ["--latent-format", latent_format]
    ref = ref.numpy()
    _, _, data = ctx.encode(model, rgb, extra)
    if data is None or data.size != ref.size:
        raise CaseFailure("tool wrote %s floats, expected %d (%s)" % (None if data is None else data.size, ref.size,
                                                                     "x".join(map(str, ref.shape))))
    rel = rel_err(data.reshape(ref.shape), ref)
    if not rel <= TOL:
        raise CaseFailure("rel=%.3e > %.0e" % (rel, TOL))
    return rel, "latent %s" % "x".join(map(str, ref.shape))


def check_decoder(ctx, model, state, family, raw, extra=(), latent_format=None):
    """Tool frames vs the reference for float32 raw latents (or the given format of them): the float pixels
    within TOL, and the 8-bit frames equal but within BOUNDARY of a truncation boundary."""
    given = raw.astype(np.float32)
    if latent_format is not None:
        given = np.asarray(V.apply_latent_format(torch.from_numpy(raw), latent_format)).astype(np.float32)
        extra = list(extra) + ["--latent-format", latent_format]
    # What the decoder sees: the given float32 values back to raw, then to the model's space.
    z = torch.from_numpy(given.astype(np.float64))
    if latent_format is not None:
        sh, sc = V.LATENT_FORMATS[latent_format]
        z = z / sc + sh
    with torch.no_grad():
        pixels = T.decoder_forward(state, T.from_raw(z, family))
    ref_u8, dist = T.comfy_u8(pixels)
    _, _, out = ctx.decode(model, given, extra)
    diff = np.abs(out.astype(np.int16) - ref_u8.astype(np.int16))
    bad = diff > 0
    if np.any(diff > 1) or np.any(dist[bad] >= BOUNDARY):
        worst = float(np.max(np.where(bad, 1.0 - dist, 0.0)))
        raise CaseFailure("%d of %d 8-bit values differ (max %d levels; a mismatch %.2e from a boundary, more "
                          "than %.0e)" % (int(bad.sum()), bad.size, int(diff.max()), 1.0 - worst, BOUNDARY))
    near = int(np.sum(dist < BOUNDARY))
    # And the pixels before 8-bit rounding (--float: after ComfyUI's clamp), within TOL.
    src = ctx.path("latents.npy")
    np.save(src, np.ascontiguousarray(given, dtype="<f4"))
    fout = ctx.path("frames.f32")
    ctx.run([ctx.decode_tool, "--model", model, "--latents", src, "--out", fout, "--float"] + list(extra), True)
    got = np.fromfile(fout, dtype="<f4").reshape(tuple(pixels.shape)).astype(np.float64)
    want = torch.clamp(pixels, 0.0, 1.0).numpy()
    rel = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
    if not rel <= TOL:
        raise CaseFailure("pixels before 8-bit rounding: rel=%.3e > %.0e" % (rel, TOL))
    return rel, "frames %s, %d/%d 8-bit values differ (all within %.0e of a boundary; %d values that close)" % (
        "x".join(map(str, out.shape)), int(bad.sum()), bad.size, BOUNDARY, near)


def real_state(name):
    tensors, _ = V.read_safetensors(os.path.join(MODELS, name))
    return tensors


# -------------------------------------------------------------------------------------------- cases

def case_real_encoder(family):
    def run(ctx):
        name = "%s_encoder.safetensors" % family
        rgb = centre(photo("chelsea", 448, 296), 136, 104)
        return check_encoder(ctx, os.path.join(MODELS, name), real_state(name), family, rgb)
    return run


def case_real_decoder(family):
    def run(ctx):
        # Realistic latents: the reference encoder's raw output of a photo crop.
        enc = real_state("%s_encoder.safetensors" % family)
        rgb = centre(photo("coffee", 384, 256), 96, 80)
        with torch.no_grad():
            raw = T.to_raw(T.encoder_forward(enc, T.frames_to_input(rgb)), family).numpy()
        name = "%s_decoder.safetensors" % family
        return check_decoder(ctx, os.path.join(MODELS, name), real_state(name), family, raw)
    return run


def case_real_taesana(ctx):
    name = "taesana_encoder.safetensors"
    rgb = centre(photo("astronaut", 512, 512), 160, 96)
    return check_encoder(ctx, os.path.join(MODELS, name), real_state(name), "taesana", rgb, multiple=32)


def random_frames(n, w, h, seed):
    return V.unpack_frames(V.make_frames(n, w, h, "RGB", seed=seed), n, w, h, None, "RGB")


def case_random_encoder(ctx):
    state = T.make_encoder_state(channels=4, width=64, seed=31)
    path = os.path.join(ctx.tmp, "taesdxl_random_encoder.safetensors")
    stored = T.write_state(path, state)
    return check_encoder(ctx, path, stored, "taesdxl", random_frames(2, 64, 48, 32))


def case_random_taef2_odd(ctx):
    # TAEF2-style pools in Blocks 11-13, F16 weights, a 75x61 frame cropped to 72x56 (latent 9x7).
    state = T.make_encoder_state(channels=32, width=64, pool_blocks=(11, 12, 13), seed=33)
    path = os.path.join(ctx.tmp, "taef2_random_encoder.safetensors")
    stored = T.write_state(path, state, dtype="F16")
    rgb = random_frames(1, 75, 61, 34)
    rel, detail = check_encoder(ctx, path, stored, "taef2", rgb)
    if "1x32x7x9" not in detail:
        raise CaseFailure("unexpected latent shape: %s" % detail)
    return rel, detail


def case_random_prefix_metadata(ctx):
    # Upstream TAESD module names ('encoder.'), BF16, no telling name: the metadata says taesd3.
    state = T.make_encoder_state(channels=16, width=32, seed=35)
    path = os.path.join(ctx.tmp, "tiny_model.safetensors")
    stored = T.write_state(path, state, dtype="BF16", prefix="encoder.", metadata={"latent_space": "taesd3"})
    return check_encoder(ctx, path, stored, "taesd3", random_frames(1, 48, 40, 36))


def case_random_option(ctx):
    # ComfyUI's prefix ('taesd_encoder.'); the option wins over a misleading file name.
    state = T.make_encoder_state(channels=16, width=32, seed=37)
    path = os.path.join(ctx.tmp, "taesd3_but_really_flux_encoder.safetensors")
    stored = T.write_state(path, state, prefix="taesd_encoder.")
    return check_encoder(ctx, path, stored, "taef1", random_frames(1, 40, 32, 38), extra=["--latent-space", "taef1"])


def case_latent_format_sd15(ctx):
    # latent-format sd15 of a taesd encoder is the model's own output: raw * 0.18215.
    name = "taesd_encoder.safetensors"
    rgb = centre(photo("astronaut", 512, 512), 64, 64)
    return check_encoder(ctx, os.path.join(MODELS, name), real_state(name), "taesd", rgb, latent_format="sd15")


def case_random_decoder(ctx):
    state = T.make_decoder_state(channels=4, width=64, seed=41)
    path = os.path.join(ctx.tmp, "taesdxl_random_decoder.safetensors")
    stored = T.write_state(path, state)
    raw = np.random.default_rng(42).normal(0, 6, size=(2, 4, 6, 5))
    return check_decoder(ctx, path, stored, "taesdxl", raw)


def case_random_taef2_decoder(ctx):
    state = T.make_decoder_state(channels=32, width=64, pool_blocks=(3, 4, 5), seed=43)
    path = os.path.join(ctx.tmp, "taef2_random_decoder.safetensors")
    stored = T.write_state(path, state, dtype="F16")
    raw = np.random.default_rng(44).normal(0, 1, size=(1, 32, 7, 9))
    return check_decoder(ctx, path, stored, "taef2", raw)


def case_random_decoder_prefix_option(ctx):
    state = T.make_decoder_state(channels=16, width=32, seed=45)
    path = os.path.join(ctx.tmp, "tiny_decoder.safetensors")
    stored = T.write_state(path, state, prefix="taesd_decoder.")
    raw = np.random.default_rng(46).normal(0.1, 3, size=(1, 16, 5, 4))
    return check_decoder(ctx, path, stored, "taef1", raw, extra=["--latent-space", "taef1"], latent_format="flux")


def case_neg_ambiguous(ctx):
    path = os.path.join(ctx.tmp, "random.safetensors")
    T.write_state(path, T.make_encoder_state(channels=4, width=16, seed=47))
    rc, err, _ = ctx.encode(path, random_frames(1, 16, 16, 48), expect_ok=False)
    for needed in ("latent space", "taesdxl_", "latent-space"):
        if rc == 0 or needed not in err:
            raise CaseFailure("exit %d, stderr lacks %r: %r" % (rc, needed, err[-500:]))
    return None, "exit %d: %s" % (rc, err.strip().splitlines()[-1][:110])


def case_neg_channels(ctx):
    path = os.path.join(ctx.tmp, "taef1_wrong_decoder.safetensors")
    T.write_state(path, T.make_decoder_state(channels=4, width=16, seed=49))
    rc, err, _ = ctx.decode(path, np.zeros((1, 4, 2, 2)), expect_ok=False)
    if rc == 0 or "4 latent channels" not in err or "16" not in err:
        raise CaseFailure("exit %d, stderr does not name 4 and 16 channels: %r" % (rc, err[-500:]))
    return None, "exit %d: %s" % (rc, err.strip().splitlines()[-1][:110])


CASES = [("real_encoder_" + f, case_real_encoder(f)) for f in FAMILIES]
CASES += [("real_decoder_" + f, case_real_decoder(f)) for f in FAMILIES]
CASES += [
    ("real_encoder_taesana", case_real_taesana),
    ("latent_format_sd15", case_latent_format_sd15),
    ("random_encoder", case_random_encoder),
    ("random_taef2_pool_75x61", case_random_taef2_odd),
    ("random_prefix_metadata", case_random_prefix_metadata),
    ("random_prefix_option", case_random_option),
    ("random_decoder", case_random_decoder),
    ("random_taef2_decoder", case_random_taef2_decoder),
    ("random_decoder_prefix_option", case_random_decoder_prefix_option),
    ("neg_ambiguous", case_neg_ambiguous),
    ("neg_channel_mismatch", case_neg_channels),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("encode_tool", nargs="?")
    ap.add_argument("decode_tool", nargs="?")
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    names = [n for n, _ in CASES]
    if a.list:
        print("\n".join(names))
        return 0
    if not (a.encode_tool and a.decode_tool):
        ap.print_usage(sys.stderr)
        return 2
    if not os.path.isdir(MODELS) or not os.path.isdir(MEDIA):
        # The shared folder is part of every checkout and of CI: its absence is a failure, not a skip.
        print("FAIL: no %s and %s (set GSTVAE_SHARED_DIR)" % (MODELS, MEDIA))
        return 1
    only = [s for o in a.only for s in o.split(",") if s]
    unknown = [o for o in only if o not in names]
    if unknown:
        print("unknown case(s): %s" % ", ".join(unknown), file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tmp = tempfile.mkdtemp(prefix="taesd-crosscheck-")
    ctx = Ctx(os.path.abspath(a.encode_tool), os.path.abspath(a.decode_tool), tmp)
    failed = []
    t_all = time.time()
    try:
        for name, fn in CASES:
            if only and name not in only:
                continue
            t0 = time.time()
            try:
                rel, detail = fn(ctx)
                rel_s = "rel=%.3e (<= %.0e)" % (rel, TOL) if rel is not None else "rel=n/a"
                print("PASS %-30s %-24s %s [%.1fs]" % (name, rel_s, detail, time.time() - t0), flush=True)
            except CaseFailure as e:
                failed.append(name)
                print("FAIL %-30s %s [%.1fs]" % (name, e, time.time() - t0), flush=True)
            except Exception as e:  # a harness bug is a failure too
                failed.append(name)
                print("FAIL %-30s harness error: %s: %s" % (name, type(e).__name__, e), flush=True)
                traceback.print_exc(file=sys.stderr)
    finally:
        if a.keep:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = len(only) if only else len(CASES)
    print("%d/%d cases passed in %.1fs%s" % (total - len(failed), total, time.time() - t_all,
                                             (": failed " + ", ".join(failed)) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
