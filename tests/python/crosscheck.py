#!/usr/bin/env python3
"""Cross-check a C++ encoder command-line tool against the float64 Python reference.

usage: scripts/python tests/python/crosscheck.py TOOL [--only NAME[,NAME...]] [--keep] [--list]
                                           [--tool-arg ARG]... [--timeout S] [--strict-per-batch]

TOOL is called as
  TOOL --model M --frames F --n N --width W --height H --format FMT --stride S --out OUT.f32
       [--precision fp32|fp16|bf16] [--latent-format raw|sd15|sdxl|sd3|flux] [--sample --seed K]
       [--per-batch B]
and must write N x z x h x w little-endian float32 latents (the Gaussian mean unless --sample) and exit 0,
or exit non-zero with a message on stderr.

Prints one line per case (PASS/FAIL, name, measured relative error rel = max|a-b| / max|b|).
Exit status: 0 all cases passed, 1 some case failed, 2 usage error / tool missing.
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
FP16_TOL = 1e-2
BF16_TOL = 5e-2
# per-batch 2 vs per-batch 5 of the same frames.  Bit-identical results are not guaranteed by LibTorch:
# on CPU (oneDNN) a 3-input-channel conv already rounds differently for batch 1, 2 and 5 (~1e-6 relative),
# so by default the two runs must agree to PER_BATCH_TOL; --strict-per-batch demands equal bits.
PER_BATCH_TOL = 1e-5


class CaseFailure(Exception):
    pass


class Ctx:
    def __init__(self, tool, tmp, tool_args, timeout):
        self.tool = tool
        self.tmp = tmp
        self.tool_args = list(tool_args)
        self.timeout = timeout
        self.strict_per_batch = False
        self._ckpts = {}
        self._counter = 0

    def _name(self, stem, ext):
        self._counter += 1
        return os.path.join(self.tmp, "%s_%03d.%s" % (stem, self._counter, ext))

    def checkpoint(self, layout="ldm", ch=32, mult=(1, 2), blocks=2, z=4, quant_conv=True, dtype="F32", seed=0,
                   include_decoder=True, drop=()):
        """(path, canonical float64 state as stored); cached per configuration."""
        key = (layout, ch, tuple(mult), blocks, z, quant_conv, dtype, seed, include_decoder, tuple(drop))
        if key not in self._ckpts:
            path = self._name("model_%s_%s" % (layout, dtype), "safetensors")
            state = V.make_checkpoint(path, layout=layout, ch=ch, mult=mult, blocks=blocks, z=z,
                                      quant_conv=quant_conv, dtype=dtype, seed=seed,
                                      include_decoder=include_decoder, drop=drop)
            self._ckpts[key] = (path, state)
        return self._ckpts[key]

    def frames(self, n, width, height, fmt="RGB", stride=None, seed=0):
        """(path, stride, uint8 N x H x W x 3 RGB as the reference sees it)."""
        bpp = V.format_bpp(fmt)
        stride = stride if stride is not None else width * bpp
        data = V.make_frames(n, width, height, fmt, stride=stride, seed=seed)
        path = self._name("frames_%s_%dx%d" % (fmt, width, height), "raw")
        with open(path, "wb") as f:
            f.write(data)
        return path, stride, V.unpack_frames(data, n, width, height, stride, fmt)

    def run_tool(self, model, frames, n, width, height, fmt, stride, precision="fp32", latent_format=None,
                 sample_seed=None, per_batch=None, expect_ok=True):
        """Run the tool; returns (rc, stderr, float32 array or None)."""
        out = self._name("out", "f32")
        cmd = [self.tool, "--model", model, "--frames", frames, "--n", str(n), "--width", str(width),
               "--height", str(height), "--format", fmt, "--stride", str(stride), "--out", out]
        if precision is not None:
            cmd += ["--precision", precision]
        if latent_format is not None:
            cmd += ["--latent-format", latent_format]
        if sample_seed is not None:
            cmd += ["--sample", "--seed", str(sample_seed)]
        if per_batch is not None:
            cmd += ["--per-batch", str(per_batch)]
        cmd += self.tool_args
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise CaseFailure("tool timed out after %ss: %s" % (self.timeout, " ".join(cmd)))
        err = p.stderr.decode("utf-8", "replace")
        if p.returncode < 0:
            raise CaseFailure("tool killed by signal %d (crash?): %s\n%s" % (-p.returncode, " ".join(cmd), err[-2000:]))
        if expect_ok and p.returncode != 0:
            raise CaseFailure("tool exited %d: %s\n%s" % (p.returncode, " ".join(cmd), err[-2000:]))
        data = None
        if p.returncode == 0 and os.path.exists(out):
            data = np.fromfile(out, dtype="<f4")
        return p.returncode, err, data


def latent_shape(state, n, width, height):
    arch = V.infer_arch(state)
    r = 2 ** (len(arch["mult"]) - 1)
    return (n, arch["z"], (height // 8 * 8) // r, (width // 8 * 8) // r)


def as_shape(data, shape, what="output"):
    if data is None:
        raise CaseFailure("%s: no output file" % what)
    if data.size != int(np.prod(shape)):
        raise CaseFailure("%s has %d floats, expected %s = %d" % (what, data.size, "x".join(map(str, shape)),
                                                                  int(np.prod(shape))))
    if not np.all(np.isfinite(data)):
        raise CaseFailure("%s contains non-finite values" % what)
    return data.reshape(shape).astype(np.float64)


def rel_err(a, b):
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


def compare_case(ctx, ckpt_kw, n=2, width=64, height=48, fmt="RGB", stride=None, seed=1, precision="fp32",
                 tol=FP32_TOL, latent_format=None, per_batch=None, expect_shape=None):
    path, state = ctx.checkpoint(**ckpt_kw)
    fpath, stride, rgb = ctx.frames(n, width, height, fmt, stride, seed)
    mean, _ = V.encode_reference(state, rgb)
    ref = mean.numpy()
    if latent_format is not None:
        ref = V.apply_latent_format(mean, latent_format).numpy()
    shape = latent_shape(state, n, width, height)
    if tuple(ref.shape) != shape:
        raise CaseFailure("reference shape %s != expected %s" % (ref.shape, shape))
    if expect_shape is not None and shape != tuple(expect_shape):
        raise CaseFailure("latent shape %s != expected %s" % (shape, tuple(expect_shape)))
    _, _, data = ctx.run_tool(path, fpath, n, width, height, fmt, stride, precision=precision,
                              latent_format=latent_format, per_batch=per_batch)
    out = as_shape(data, shape)
    rel = rel_err(out, ref)
    detail = "shape %s" % "x".join(map(str, shape))
    if not rel < tol:
        raise CaseFailure("rel=%.3e >= %.0e (%s)" % (rel, tol, detail))
    return rel, tol, detail


# ------------------------------------------------------------------------------------------------ cases

SMALL = dict(ch=32, mult=(1, 2), blocks=2, z=4)
FOUR_LEVEL = dict(ch=32, mult=(1, 2, 2, 2), blocks=1, z=4)   # downscale 8, cheap


def case_layout(layout):
    return lambda ctx: compare_case(ctx, dict(SMALL, layout=layout), seed=11)


def case_z16_no_quant(ctx):
    return compare_case(ctx, dict(SMALL, z=16, quant_conv=False), seed=12)


def case_dtype(dtype):
    return lambda ctx: compare_case(ctx, dict(SMALL, dtype=dtype), seed=13)


def case_odd_size(ctx):
    # 45x37: crop keeps cols 2..41 and rows 2..33 -> 40x32 -> latent w=5, h=4
    return compare_case(ctx, FOUR_LEVEL, n=2, width=45, height=37, seed=14, expect_shape=(2, 4, 4, 5))


def case_format(fmt):
    return lambda ctx: compare_case(ctx, SMALL, n=2, width=40, height=32, fmt=fmt, seed=15)


def case_stride(fmt):
    return lambda ctx: compare_case(ctx, SMALL, n=2, width=40, height=32, fmt=fmt,
                                    stride=40 * V.format_bpp(fmt) + 13, seed=16)


def case_three_level(ctx):
    return compare_case(ctx, dict(ch=32, mult=(1, 2, 2), blocks=1, z=4), n=2, width=64, height=48, seed=17)


def case_full_width(ctx):
    # Encoder only: a full-size random decoder would add 50 M parameters to write for nothing here.
    return compare_case(ctx, dict(ch=128, mult=(1, 2, 4, 4), blocks=2, z=4, include_decoder=False), n=1, width=32,
                        height=32, seed=18)


def case_per_batch(ctx):
    path, state = ctx.checkpoint(**SMALL)
    n, w, h = 5, 32, 24
    fpath, stride, rgb = ctx.frames(n, w, h, "RGB", None, 19)
    shape = latent_shape(state, n, w, h)
    _, _, d2 = ctx.run_tool(path, fpath, n, w, h, "RGB", stride, per_batch=2)
    _, _, d5 = ctx.run_tool(path, fpath, n, w, h, "RGB", stride, per_batch=5)
    a2, a5 = as_shape(d2, shape, "per-batch 2 output"), as_shape(d5, shape, "per-batch 5 output")
    ref = V.encode_reference(state, rgb)[0].numpy()
    bitwise = np.array_equal(d2, d5)
    rel25 = rel_err(a2, a5)
    if ctx.strict_per_batch and not bitwise:
        raise CaseFailure("per-batch 2 and per-batch 5 differ: rel %.3e (--strict-per-batch wants bit-identical)"
                          % rel25)
    if not rel25 < PER_BATCH_TOL:
        raise CaseFailure("per-batch 2 and per-batch 5 differ: rel %.3e >= %.0e" % (rel25, PER_BATCH_TOL))
    rel = max(rel_err(a2, ref), rel_err(a5, ref))
    if not rel < FP32_TOL:
        raise CaseFailure("rel=%.3e >= %.0e" % (rel, FP32_TOL))
    return rel, FP32_TOL, "shape %s, per-batch 2 vs 5: %s" % (
        "x".join(map(str, shape)), "bit-identical" if bitwise else "rel %.1e (not bit-identical)" % rel25)


def case_latent(fmt):
    return lambda ctx: compare_case(ctx, SMALL, n=1, width=64, height=48, seed=20, latent_format=fmt)


def case_precision(precision, tol):
    """Reduced precision: random-weight networks lose far more than the nominal
    bf16/fp16 epsilon over ~20 layers, so the bound is relative to PyTorch eager
    in the same dtype on the same weights: no worse than twice its error (and
    `tol` as an absolute floor). Where the dtype cannot run on the CPU at all,
    the tool must refuse it cleanly, naming the precision and the device."""
    def run(ctx):
        path, state = ctx.checkpoint(**SMALL)
        fpath, stride, rgb = ctx.frames(2, 64, 48, "RGB", None, 21)
        mean, _ = V.encode_reference(state, rgb)
        ref = mean.numpy()
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        z = V.infer_arch(state)["z"]
        try:
            x = V.frames_to_input(rgb)
            with torch.no_grad():
                eager = V.encoder_forward({k: v.to(dt) for k, v in state.items()}, x.to(dt))[:, :z].double().numpy()
            eager_rel = rel_err(eager, ref)
        except RuntimeError as e:
            eager_rel = None
            eager_err = str(e)
        rc, err, data = ctx.run_tool(path, fpath, 2, 64, 48, "RGB", stride, precision=precision, expect_ok=False)
        if eager_rel is None:
            if rc != 0 and precision in err and "cpu" in err:
                return float("nan"), tol, "refused cleanly like PyTorch eager (%s)" % eager_err.splitlines()[0][:60]
            raise CaseFailure("PyTorch eager cannot run %s here (%s) but the tool gave rc=%d: %s"
                              % (precision, eager_err[:80], rc, err[-300:]))
        if rc != 0:
            raise CaseFailure("tool failed where PyTorch eager %s works: %s" % (precision, err[-500:]))
        out = as_shape(data, latent_shape(state, 2, 64, 48))
        rel = rel_err(out, ref)
        bound = max(tol, 2 * eager_rel)
        if not rel < bound:
            raise CaseFailure("rel=%.3e >= %.3e (PyTorch eager %s: %.3e)" % (rel, bound, precision, eager_rel))
        return rel, bound, "PyTorch eager %s rel %.3e" % (precision, eager_rel)
    return run


def case_sample(ctx):
    path, state = ctx.checkpoint(**SMALL)
    n, w, h = 2, 64, 64   # 2 x 4 x 32 x 32 = 8192 latent values
    fpath, stride, rgb = ctx.frames(n, w, h, "RGB", None, 22)
    shape = latent_shape(state, n, w, h)
    mean_ref, logvar = V.encode_reference(state, rgb)
    _, _, dm = ctx.run_tool(path, fpath, n, w, h, "RGB", stride)
    _, _, s1 = ctx.run_tool(path, fpath, n, w, h, "RGB", stride, sample_seed=1)
    _, _, s1b = ctx.run_tool(path, fpath, n, w, h, "RGB", stride, sample_seed=1)
    _, _, s2 = ctx.run_tool(path, fpath, n, w, h, "RGB", stride, sample_seed=2)
    m = as_shape(dm, shape, "mean output")
    a, b, c = (as_shape(x, shape, "sample output") for x in (s1, s1b, s2))
    rel = rel_err(m, mean_ref.numpy())
    if not rel < FP32_TOL:
        raise CaseFailure("mean: rel=%.3e >= %.0e" % (rel, FP32_TOL))
    if not np.array_equal(s1, s1b):
        raise CaseFailure("same --seed gave different samples (max |diff| %.3e)" % np.max(np.abs(a - b)))
    if np.array_equal(s1, s2) or np.mean(a == c) > 0.01:
        raise CaseFailure("different --seed gave (nearly) the same sample")
    if np.array_equal(s1, dm):
        raise CaseFailure("--sample output equals the mean")
    std = np.exp(0.5 * logvar.numpy())
    stats = []
    for s in (a, c):
        eps = (s - m) / std
        mu, sd = float(eps.mean()), float(eps.std())
        stats.append("eps mean %+.3f std %.3f" % (mu, sd))
        if not (abs(mu) < 0.2 and 0.7 < sd < 1.3):
            raise CaseFailure("(sample - mean)/exp(0.5*logvar) is not ~N(0,1): mean %.3f std %.3f over %d values"
                              % (mu, sd, eps.size))
    eps_corr = float(np.corrcoef(((a - m) / std).ravel(), ((c - m) / std).ravel())[0, 1])
    if abs(eps_corr) > 0.1:
        raise CaseFailure("noise of seeds 1 and 2 is correlated (r=%.3f)" % eps_corr)
    return rel, FP32_TOL, "%d values; %s; corr(seed1, seed2) %.3f" % (a.size, "; ".join(stats), eps_corr)


def case_missing_tensor(ctx):
    key = "encoder.conv_out.weight"
    path, _ = ctx.checkpoint(**dict(SMALL, drop=(key,)))
    fpath, stride, _ = ctx.frames(1, 32, 32, "RGB", None, 23)
    rc, err, _ = ctx.run_tool(path, fpath, 1, 32, 32, "RGB", stride, expect_ok=False)
    if rc == 0:
        raise CaseFailure("tool accepted a checkpoint without %s" % key)
    if key not in err:
        raise CaseFailure("exit %d but stderr does not name %s: %r" % (rc, key, err[-500:]))
    return None, None, "exit %d, stderr names %s" % (rc, key)


def case_small_frame(ctx):
    path, _ = ctx.checkpoint(**FOUR_LEVEL)
    fpath, stride, _ = ctx.frames(1, 7, 16, "RGB", None, 24)
    rc, err, _ = ctx.run_tool(path, fpath, 1, 7, 16, "RGB", stride, expect_ok=False)
    if rc == 0:
        raise CaseFailure("tool accepted a 7-pixel-wide frame")
    if not err.strip():
        raise CaseFailure("exit %d without a message on stderr" % rc)
    return None, None, "exit %d: %s" % (rc, err.strip().splitlines()[-1][:100])


CASES = [
    ("ldm", case_layout("ldm")),
    ("first_stage_model", case_layout("first_stage_model")),
    ("vae_prefix", case_layout("vae")),
    ("diffusers", case_layout("diffusers")),
    ("diffusers_old", case_layout("diffusers_old")),
    ("z16_no_quant_conv", case_z16_no_quant),
    ("f16_weights", case_dtype("F16")),
    ("bf16_weights", case_dtype("BF16")),
    ("odd_size_45x37", case_odd_size),
    ("format_RGBA", case_format("RGBA")),
    ("format_xBGR", case_format("xBGR")),
    ("format_ARGB", case_format("ARGB")),
    ("format_BGRx", case_format("BGRx")),
    ("stride_RGB", case_stride("RGB")),
    ("stride_BGRA", case_stride("BGRA")),
    ("three_level", case_three_level),
    ("full_width_ch128", case_full_width),
    ("per_batch", case_per_batch),
    ("latent_sd3", case_latent("sd3")),
    ("latent_sd15", case_latent("sd15")),
    ("latent_flux", case_latent("flux")),
    ("precision_fp16", case_precision("fp16", FP16_TOL)),
    ("precision_bf16", case_precision("bf16", BF16_TOL)),
    ("sample", case_sample),
    ("neg_missing_tensor", case_missing_tensor),
    ("neg_small_frame", case_small_frame),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description="cross-check the C++ encoder tool against the Python reference")
    ap.add_argument("tool", nargs="?", help="path of the C++ command-line tool")
    ap.add_argument("--only", action="append", default=[], help="run only these cases (comma list, repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--list", action="store_true", help="list case names and exit")
    ap.add_argument("--tool-arg", action="append", default=[], help="extra argument passed to every tool run")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per tool run")
    ap.add_argument("--strict-per-batch", action="store_true",
                    help="require per-batch 2 and per-batch 5 outputs to be bit-identical")
    a = ap.parse_args(argv)

    names = [n for n, _ in CASES]
    if a.list:
        print("\n".join(names))
        return 0
    if not a.tool:
        ap.print_usage(sys.stderr)
        print("crosscheck: error: the tool path is required", file=sys.stderr)
        return 2
    tool = a.tool if os.sep in a.tool else (shutil.which(a.tool) or a.tool)
    if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
        print("crosscheck: error: tool not found or not executable: %s" % a.tool, file=sys.stderr)
        return 2
    tool = os.path.abspath(tool)
    only = [s for o in a.only for s in o.split(",") if s]
    unknown = [o for o in only if o not in names]
    if unknown:
        print("crosscheck: error: unknown case(s) %s; known: %s" % (", ".join(unknown), ", ".join(names)),
              file=sys.stderr)
        return 2
    selected = [(n, f) for n, f in CASES if not only or n in only]

    tmp = tempfile.mkdtemp(prefix="vaeencode-crosscheck-")
    ctx = Ctx(tool, tmp, a.tool_arg, a.timeout)
    ctx.strict_per_batch = a.strict_per_batch
    failed = []
    t_all = time.time()
    try:
        for name, fn in selected:
            t0 = time.time()
            try:
                rel, tol, detail = fn(ctx)
                rel_s = "rel=%.3e (< %.0e)" % (rel, tol) if rel is not None else "rel=n/a"
                print("PASS %-20s %-24s %s [%.1fs]" % (name, rel_s, detail, time.time() - t0), flush=True)
            except CaseFailure as e:
                failed.append(name)
                print("FAIL %-20s %s [%.1fs]" % (name, e, time.time() - t0), flush=True)
            except Exception as e:  # a bug in the harness or reference, still a failure
                failed.append(name)
                print("FAIL %-20s harness error: %s: %s [%.1fs]" % (name, type(e).__name__, e, time.time() - t0),
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
