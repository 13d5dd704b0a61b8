#!/usr/bin/env python3
"""Cross-check the engine's TAEHV family (sessions) against the float64 reference (taehv_reference.py).

usage: scripts/python tests/python/crosscheck_taehv.py PROBE_TOOL [--quick] [--keep]

PROBE_TOOL is taehv-probe (tests/taehv_probe.cpp), which runs engine sessions in fp32 on the CPU.
For generated taew2_1 and taew2_2 weights (no real TAEHV weights exist here) stored in F32, F16 and BF16,
clips of 1..9 frames delivered in batches of 1, 3, 4 and 7 frames, ending with the held frames dropped
or padded: the latent count, every span (first frame of the group, 4), the dropped span and the padded
count must be exact, and the raw latents must agree with the reference (whole clip, float64, weights
rounded as stored) to rel = max|a-b| / max|b| <= 1e-4, both as raw latents and as the network's
normalised output ((raw - mean) / std).  Then the newer files in F32 (F16 for one): taehv1_5 (raw = x /
1.03682), lighttaehy1_5 (LeakyReLU, RGB in [-1, 1]; the same weights as taehv1_5, told apart by the file
name), taeltx_2 and taeltx2_3 (8 frames per latent: clips of 1..17 frames, groups of 8).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import taehv_reference as R  # noqa: E402

TOL = 1e-4
PLANS = ("1", "3", "4", "7")
G = R.FRAMES_PER_LATENT
# (variant, encoder width, frame height x width, dtypes, clip lengths)
NEWER = (("taehv1_5", 8, (32, 48), ("F32", "F16"), range(1, 10)),
         ("lighttaehy1_5", 8, (32, 48), ("F32",), range(1, 10)),
         ("taeltx_2", 8, (32, 64), ("F32",), (1, 7, 8, 9, 15, 16, 17)),
         ("taeltx2_3", 8, (64, 32), ("F32",), (8, 17)))


def rel_err(a, b):
    b = np.asarray(b, dtype=np.float64)
    if b.size == 0:
        return 0.0
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


def expected_accounting(t, end, g=G):
    """(spans, dropped [first, count], padded) the session must report for a clip of t frames."""
    full = t // g
    left = t - full * g
    spans = [[g * k, g] for k in range(full)]
    if left and end == "pad":
        return spans + [[g * full, g]], [0, 0], g - left
    if left and end == "drop":
        return spans, [g * full, left], 0
    return spans, [0, 0], 0


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("probe")
    ap.add_argument("--quick", action="store_true", help="F32 only, clips of 1, 4, 5, 9 frames")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="crosscheck-taehv-")
    cases, checks = [], []
    worst = {}
    try:
        rng = np.random.default_rng(5)
        runs = [(v, wd, hw, ("F32",) if args.quick else ("F32", "F16", "BF16"),
                 (1, 4, 5, 9) if args.quick else range(1, 10))
                for v, wd, hw in (("taew2_1", 16, (32, 48)), ("taew2_2", 12, (32, 48)))]
        runs += [(v, wd, hw, dts[:1] if args.quick else dts, ts) for v, wd, hw, dts, ts in NEWER]
        for variant, width, (h, w), dtypes, lengths in runs:
            g = R.frames_per_latent(variant)
            frames_u8 = rng.integers(0, 256, size=(max(lengths), h, w, 3), dtype=np.uint8)
            # Smooth it a little: random bytes plus a gradient, so that both matter.
            frames_u8 = ((frames_u8.astype(np.int32) + np.arange(w)[None, None, :, None] * 4) % 256).astype(np.uint8)
            frames_path = os.path.join(tmp, variant + ".rgb")
            frames_u8.tofile(frames_path)
            frames = R.frames_to_input(frames_u8)
            for dtype in dtypes:
                # upstream's file names: they say which variant where two share the shapes
                model = os.path.join(tmp, "%s_%s.safetensors" % (variant, dtype.lower()))
                stored = R.write_state(model, R.make_state(variant, width, seed=11), dtype,
                                       decoder_stub=(dtype == "F16"))
                for t in lengths:
                    for end in ("drop", "pad", "open"):
                        ref_end = "pad" if end == "pad" else "drop"
                        norm = R.encode_clip(stored, frames[:t], ref_end, variant)
                        ref = R.to_raw(norm, variant).numpy()
                        for plan in PLANS:
                            out = os.path.join(tmp, "out-%d.f32" % len(cases))
                            cases.append("%s fp32 %s %d %d %d %s %s %s" % (model, frames_path, t, w, h, plan, end, out))
                            checks.append((variant, dtype, t, plan, end, ref, norm.numpy(), out, g))
        proc = subprocess.run([args.probe], input="\n".join(cases) + "\n", capture_output=True, text=True,
                              timeout=1800)
        if proc.returncode != 0:
            print(proc.stderr)
            print("FAIL: probe exited with %d" % proc.returncode)
            return 1
        results = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        if len(results) != len(checks):
            print("FAIL: %d results for %d cases\n%s" % (len(results), len(checks), proc.stderr))
            return 1
        failures = 0
        for (variant, dtype, t, plan, end, ref, norm, out, g), res in zip(checks, results):
            name = "%s %s T=%d plan=%s end=%s" % (variant, dtype, t, plan, end)
            problems = []
            if "error" in res:
                problems.append(res["error"])
            else:
                spans, dropped, padded = expected_accounting(t, end, g)
                if res["family"] != "taehv" or res["temporal"] != g:
                    problems.append("family %s temporal %s" % (res["family"], res["temporal"]))
                if res["spans"] != spans:
                    problems.append("spans %s, expected %s" % (res["spans"], spans))
                if res["dropped"] != dropped or res["padded"] != padded:
                    problems.append("dropped %s padded %s, expected %s %s"
                                    % (res["dropped"], res["padded"], dropped, padded))
                held = t % g if end == "open" else 0
                if res["held"] != held:
                    problems.append("held %d, expected %d" % (res["held"], held))
                got = np.fromfile(out, dtype=np.float32)
                if got.size != ref.size:
                    problems.append("%d floats, expected %d" % (got.size, ref.size))
                else:
                    # Raw latents, and the network's own (normalised) output, so that the mean
                    # added per channel cannot hide an error in the network.
                    got = got.reshape(ref.shape).astype(np.float64)
                    got_norm = R.from_raw(torch.from_numpy(got), variant).numpy()
                    err = max(rel_err(got, ref), rel_err(got_norm, norm))
                    key = (variant, dtype)
                    worst[key] = max(worst.get(key, 0.0), err)
                    if not err <= TOL:
                        problems.append("rel err %.3g > %g" % (err, TOL))
            if problems:
                failures += 1
                print("FAIL %s: %s" % (name, "; ".join(problems)))
        for (variant, dtype), err in sorted(worst.items()):
            print("%s %s: worst rel err %.3g, batches of %s frames" % (variant, dtype, err, "/".join(PLANS)))
        print("%s: %d of %d cases passed" % ("FAIL" if failures else "OK", len(checks) - failures, len(checks)))
        return 1 if failures else 0
    finally:
        if args.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
