#!/usr/bin/python3
"""Round-trip PSNR of the real TAESD weights through the engine, against the anchors in shared/models/README.md.

usage: /usr/bin/python3 taesd_psnr.py ENCODE_TOOL DECODE_TOOL [--tolerance DB]

For each family (taesd, taesdxl, taesd3, taef1, taef2) and each photo in shared/media: encode with the engine
(fp32, CPU; raw latents), decode them back (latent-format raw), keep ComfyUI's 8 bits, and compare with the
original photo. Each PSNR must be within 0.2 dB of the README's table (measured there with upstream taesd.py).
Prints the table. Exit 0 all within, 1 otherwise, 77 (skipped) without ../shared beside the repository.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("GSTVAE_SHARED_DIR") or os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared"))
MODELS = os.path.join(SHARED, "models")
MEDIA = os.path.join(SHARED, "media")

PHOTOS = (("astronaut", 512, 512), ("chelsea", 448, 296), ("coffee", 384, 256))
# shared/models/README.md, "Anchor numbers": upstream taesd.py, fp32 CPU.
ANCHORS = {
    "taesd": (25.35, 27.03, 24.90),
    "taesdxl": (25.72, 28.15, 24.90),
    "taesd3": (30.39, 31.67, 27.99),
    "taef1": (28.69, 31.29, 26.56),
    "taef2": (31.18, 32.80, 29.39),
}


def run(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    if p.returncode != 0:
        raise RuntimeError("exit %d: %s\n%s" % (p.returncode, " ".join(cmd), p.stderr.decode("utf-8", "replace")))


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("encode_tool")
    ap.add_argument("decode_tool")
    ap.add_argument("--tolerance", type=float, default=0.2, help="dB either side of the anchor")
    a = ap.parse_args(argv)
    if not os.path.isdir(MODELS) or not os.path.isdir(MEDIA):
        print("SKIP: no %s and %s (set GSTVAE_SHARED_DIR)" % (MODELS, MEDIA))
        return 77
    common = ["--device", "cpu", "--precision", "fp32"]
    failures = []
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="taesd-psnr-") as tmp:
        for family, anchors in ANCHORS.items():
            row = []
            for (name, w, h), anchor in zip(PHOTOS, anchors):
                src = os.path.join(MEDIA, "%s-%dx%d.rgb" % (name, w, h))
                original = np.fromfile(src, dtype=np.uint8)
                latents = os.path.join(tmp, "%s_%s.f32" % (family, name))
                run([a.encode_tool, "--model", os.path.join(MODELS, family + "_encoder.safetensors"), "--frames", src,
                     "--n", "1", "--width", str(w), "--height", str(h), "--format", "RGB", "--out", latents] + common)
                npy = latents[:-4] + ".npy"
                np.save(npy, np.fromfile(latents, dtype="<f4").reshape(1, -1, h // 8, w // 8))
                decoded = os.path.join(tmp, "%s_%s.rgb" % (family, name))
                run([a.decode_tool, "--model", os.path.join(MODELS, family + "_decoder.safetensors"), "--latents", npy,
                     "--out", decoded] + common)
                value = psnr(np.fromfile(decoded, dtype=np.uint8), original)
                ok = abs(value - anchor) <= a.tolerance
                if not ok:
                    failures.append("%s %s: %.2f dB, anchor %.2f" % (family, name, value, anchor))
                row.append("%6.2f (%+.2f)%s" % (value, value - anchor, "" if ok else " !"))
            rows.append((family, row))
    header = "| model | " + " | ".join("%s %dx%d" % p for p in PHOTOS) + " |"
    print(header)
    print("|" + "---|" * (len(PHOTOS) + 1))
    for family, row in rows:
        print("| %s | %s |" % (family, " | ".join(row)))
    print("PSNR in dB (difference to the README anchor); tolerance %.2f dB; %.1f s" % (a.tolerance, time.time() - t0))
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS: all %d round trips within %.2f dB of the anchors" % (len(ANCHORS) * len(PHOTOS), a.tolerance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
