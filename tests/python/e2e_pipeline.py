#!/usr/bin/env python3
"""End to end: videotestsrc -> vaeencode -> filesink through gst-launch-1.0.

The file must hold exactly frames x C x h x w float32 values, equal to what the
engine (gst-vae-encode-file, same batches) computes for the same frames, and
within 1e-4 of the float64 Python reference. Frames are captured through a tee
so both sides see identical pixels (RGB rows of 45 pixels are padded to 136
bytes by GStreamer: the strided path is exercised)."""
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vae_reference as V  # noqa: E402

TOOL = os.environ["GSTVAE_ENCODE_TOOL"]
N, W, H, PER_BATCH = 7, 45, 37, 3
STRIDE = (W * 3 + 3) // 4 * 4


def run(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    out = p.stdout.decode("utf-8", "replace")
    if p.returncode != 0:
        sys.exit("FAIL: %s exited %d\n%s" % (cmd[0], p.returncode, out[-3000:]))
    return out


def main():
    with tempfile.TemporaryDirectory(prefix="gstvae-e2e-") as tmp:
        model = os.path.join(tmp, "vae.safetensors")
        state = V.make_checkpoint(model, layout="ldm", ch=32, mult=(1, 2, 2, 2), blocks=1, z=4, seed=3)
        frames = os.path.join(tmp, "frames.raw")
        latents = os.path.join(tmp, "latents.f32")
        out = run(["gst-launch-1.0", "-m", "videotestsrc", "num-buffers=%d" % N, "pattern=smpte",
                   "!", "video/x-raw,format=RGB,width=%d,height=%d,framerate=10/1" % (W, H),
                   "!", "tee", "name=t",
                   "t.", "!", "queue", "!", "filesink", "location=" + frames,
                   "t.", "!", "queue", "!", "vaeencode", "model=" + model, "per-batch=%d" % PER_BATCH,
                   "!", "filesink", "location=" + latents])
        progress = [l for l in out.splitlines() if "vaeencode-progress" in l]
        if len(progress) != 3:  # 3 + 3 + 1 frames
            sys.exit("FAIL: expected 3 vaeencode-progress messages, got %d\n%s" % (len(progress), out[-3000:]))
        if os.path.getsize(frames) != N * H * STRIDE:
            sys.exit("FAIL: captured %d bytes of frames, expected %d" % (os.path.getsize(frames), N * H * STRIDE))

        z, h, w = 4, H // 8, W // 8
        got = np.fromfile(latents, dtype="<f4")
        if got.size != N * z * h * w:
            sys.exit("FAIL: %s holds %d floats, expected %d x %d x %d x %d = %d"
                     % (latents, got.size, N, z, h, w, N * z * h * w))

        engine_out = os.path.join(tmp, "engine.f32")
        run([TOOL, "--model", model, "--frames", frames, "--n", str(N), "--width", str(W), "--height", str(H),
             "--format", "RGB", "--stride", str(STRIDE), "--per-batch", str(PER_BATCH), "--out", engine_out])
        engine = np.fromfile(engine_out, dtype="<f4")
        if not np.array_equal(got, engine):
            sys.exit("FAIL: pipeline latents differ from the engine's: max |diff| %g"
                     % np.abs(got - engine).max())

        rgb = V.unpack_frames(open(frames, "rb").read(), N, W, H, STRIDE, "RGB")
        mean, _ = V.encode_reference(state, rgb)
        ref = mean.numpy().reshape(-1)
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        if not rel < 1e-4:
            sys.exit("FAIL: pipeline latents vs float64 reference: rel %.3e >= 1e-4" % rel)
        print("PASS: %d frames of %dx%d (stride %d) -> %d latents of %dx%dx%d; equal to the engine; "
              "rel %.2e vs float64 reference; %d progress messages" % (N, W, H, STRIDE, N, z, h, w, rel,
                                                                      len(progress)))


if __name__ == "__main__":
    main()
