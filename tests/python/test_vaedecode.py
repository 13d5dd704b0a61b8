#!/usr/bin/env python3
"""vaedecode in real pipelines: the real TAESD-family weights in ../shared/models
round-tripping the photos in ../shared/media through gst-launch-1.0 (PSNR
within 0.2 dB of the figures in ../shared/models/README.md), the element's
frames against the float64 reference decoder, timestamps and flags carried
from the latents, scaled latent formats, output formats, batching invariance,
flushes and errors; streams refused at their caps (the element's own error,
once, and gst-launch-1.0 exiting every time).

Run with GST_PLUGIN_PATH pointing at the build's gst folder and scripts/python
(numpy, torch, gi). GSTVAE_DECODE_CASES=word,... runs the cases whose names
contain one of the words."""
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from casekit import finish, run_selected  # noqa: E402

import gi  # noqa: E402

gi.require_version("Gst", "1.0")
from gi.repository import GLib, Gst  # noqa: E402

SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared"))
MODELS = os.path.join(SHARED, "models")
MEDIA = os.path.join(SHARED, "media")
PHOTOS = [("astronaut", 512, 512), ("chelsea", 448, 296), ("coffee", 384, 256)]
# ../shared/models/README.md, "Anchor numbers": round-trip PSNR in dB.
ANCHOR_PSNR = {
    "taesd": (25.35, 27.03, 24.90),
    "taesdxl": (25.72, 28.15, 24.90),
    "taesd3": (30.39, 31.67, 27.99),
    "taef1": (28.69, 31.29, 26.56),
    "taef2": (31.18, 32.80, 29.39),
}
LATENT_CHANNELS = {"taesd": 4, "taesdxl": 4, "taesd3": 16, "taef1": 16, "taef2": 32}


def model(name, part):
    return os.path.join(MODELS, "%s_%s.safetensors" % (name, part))


def photo(name, w, h):
    with open(os.path.join(MEDIA, "%s-%dx%d.rgb" % (name, w, h)), "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(h, w, 3)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0 ** 2 / mse)


def launch(args, timeout=300):
    return subprocess.run(["gst-launch-1.0", "-q"] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout)


def raw_source(path, w, h, frames=1):
    return ["filesrc", "location=%s" % path, "blocksize=%d" % (w * h * 3), "num-buffers=%d" % frames, "!",
            "rawvideoparse", "width=%d" % w, "height=%d" % h, "format=rgb", "framerate=1/1", "!"]


def round_trip(c, enc, dec, w, h, src_path, out_path, extra_enc=(), extra_dec=(), fmt="RGB"):
    r = launch(raw_source(src_path, w, h) + ["vaeencode", "model=%s" % enc, "device=cpu", "precision=fp32"] +
               list(extra_enc) + ["!", "vaedecode", "model=%s" % dec, "device=cpu", "precision=fp32"] +
               list(extra_dec) + ["!", "video/x-raw,format=%s" % fmt, "!", "filesink", "location=%s" % out_path])
    c.need(r.returncode == 0, "gst-launch failed (%d): %s" % (r.returncode, r.stderr[-2000:]))
    with open(out_path, "rb") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8)
    bpp = 3 if len(fmt) == 3 else 4
    c.need(data.size == w * h * bpp, "decoded %d bytes, expected %d" % (data.size, w * h * bpp))
    return data.reshape(h, w, bpp)


# --------------------------------------------------------------------- cases

def case_psnr(c, tmp):
    rows = []
    for name, anchors in ANCHOR_PSNR.items():
        for (photo_name, w, h), anchor in zip(PHOTOS, anchors):
            src = os.path.join(MEDIA, "%s-%dx%d.rgb" % (photo_name, w, h))
            out = round_trip(c, model(name, "encoder"), model(name, "decoder"), w, h, src,
                             os.path.join(tmp, "rt.rgb"))
            value = psnr(out, photo(photo_name, w, h))
            rows.append("%s/%s %.2f dB (README %.2f)" % (name, photo_name, value, anchor))
            c.check(abs(value - anchor) <= 0.2, "%s on %s: PSNR %.2f dB, README %.2f dB (more than 0.2 dB apart)"
                    % (name, photo_name, value, anchor))
    print("    " + "\n    ".join(rows))
    return "%d round trips" % len(rows)


def case_reference(c, tmp):
    """The element's 8-bit frames equal the float64 reference decoder's, but
    where the reference value lies within 1e-4 of a rounding boundary."""
    import torch
    import taesd_reference as ref
    for name in ("taesd", "taef2"):
        channels = LATENT_CHANNELS[name]
        rng = np.random.default_rng(5)
        latents = rng.standard_normal((2, channels, 9, 7)).astype(np.float32)
        frames, _ = decode_with_appsrc(c, model(name, "decoder"), latents, latent_format="raw", per_batch=2)
        c.need(frames is not None, "%s: decode failed: %s" % (name, _))
        state, _meta = ref.load_state(model(name, "decoder"))
        state = {k: v.to(torch.float64) for k, v in state.items()}
        z = ref.from_raw(torch.from_numpy(latents).to(torch.float64), name)
        want, dist = ref.comfy_u8(ref.decoder_forward(state, z))
        got = np.stack(frames)
        mismatch = (got != want) & (dist >= 1e-4)
        c.check(not mismatch.any(), "%s: %d of %d bytes differ from the reference" % (name, mismatch.sum(),
                                                                                     mismatch.size))


def make_latents(n, channels, h, w, seed=3):
    return np.random.default_rng(seed).standard_normal((n, channels, h, w)).astype(np.float32)


def decode_with_appsrc(c, decoder, latents, latent_format="raw", per_batch=4, fmt="RGB", batch_timeout=0,
                       timestamps=None, flush_after=None, extra=""):
    """Pushes latents through appsrc ! vaedecode ! appsink; returns the frames
    (H x W x bpp uint8) and the output buffers' (pts, duration, discont, offset)."""
    n, ch, h, w = latents.shape
    caps = ("application/x-latent,format=F32,channels=%d,width=%d,height=%d,framerate=25/1,latent-format=%s"
            % (ch, w, h, latent_format))
    pipe = Gst.parse_launch(
        "appsrc name=src format=time caps=\"%s\" ! vaedecode name=dec model=%s device=cpu precision=fp32 "
        "per-batch=%d batch-timeout=%d %s ! video/x-raw,format=%s ! appsink name=sink sync=false"
        % (caps, decoder, per_batch, batch_timeout, extra, fmt))
    src, sink = pipe.get_by_name("src"), pipe.get_by_name("sink")
    frames, metas = [], []

    def on_sample(appsink):
        s = appsink.emit("pull-sample")
        b = s.get_buffer()
        ok, m = b.map(Gst.MapFlags.READ)
        frames.append(np.frombuffer(bytes(m.data), dtype=np.uint8).reshape(h * 8, w * 8, -1))
        b.unmap(m)
        metas.append((b.pts, b.duration, bool(b.get_flags() & Gst.BufferFlags.DISCONT), b.offset))
        return Gst.FlowReturn.OK

    sink.set_property("emit-signals", True)
    sink.connect("new-sample", on_sample)
    bus = pipe.get_bus()
    pipe.set_state(Gst.State.PLAYING)
    for i in range(n):
        b = Gst.Buffer.new_wrapped(latents[i].tobytes())
        pts, dur, discont = timestamps[i] if timestamps else (i * Gst.SECOND // 25, Gst.SECOND // 25, i == 0)
        b.pts, b.duration, b.offset = pts, dur, 1000 + i
        if discont:
            b.set_flags(Gst.BufferFlags.DISCONT)
        src.emit("push-buffer", b)
        if flush_after is not None and i == flush_after:
            pipe.send_event(Gst.Event.new_flush_start())
            pipe.send_event(Gst.Event.new_flush_stop(True))
    src.emit("end-of-stream")
    msg = bus.timed_pop_filtered(120 * Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
    error = None
    if msg and msg.type == Gst.MessageType.ERROR:
        err, dbg = msg.parse_error()
        error = "%s (%s)" % (err.message, dbg)
    pipe.set_state(Gst.State.NULL)
    c.need(msg is not None, "no EOS within 120 s")
    if error:
        return None, error
    return frames, metas


def case_timestamps(c, tmp):
    lat = make_latents(5, 4, 6, 5)
    ts = [(0, 40, True), (40, 40, False), (80, 50, False), (500, 40, True), (540, Gst.CLOCK_TIME_NONE, False)]
    ts = [(p * Gst.MSECOND, d if d == Gst.CLOCK_TIME_NONE else d * Gst.MSECOND, f) for p, d, f in ts]
    frames, metas = decode_with_appsrc(c, model("taesd", "decoder"), lat, per_batch=3, timestamps=ts)
    c.need(frames is not None, "decode failed: %s" % metas)
    c.check(len(frames) == 5, "%d frames for 5 latents" % len(frames))
    want = [(p, d, f, 1000 + i) for i, (p, d, f) in enumerate(ts)]
    c.check(metas == want, "output timestamps %s, expected %s" % (metas, want))


def case_batching(c, tmp):
    lat = make_latents(7, 4, 5, 6)
    base, _ = decode_with_appsrc(c, model("taesd", "decoder"), lat, per_batch=1)
    c.need(base is not None and len(base) == 7, "per-batch 1 failed")
    for pb, timeout in ((3, 0), (16, 0), (4, 1)):
        frames, _ = decode_with_appsrc(c, model("taesd", "decoder"), lat, per_batch=pb, batch_timeout=timeout)
        c.need(frames is not None, "per-batch %d failed" % pb)
        c.check(len(frames) == 7 and all(np.array_equal(a, b) for a, b in zip(frames, base)),
                "per-batch %d batch-timeout %d: frames differ from per-batch 1" % (pb, timeout))


def case_scaled_formats(c, tmp):
    """Scaled latents are turned back into raw ones: sd15-scaled latents decode
    like the raw ones they came from (bytes within 1 of each other, since the
    scaling rounds in float32)."""
    lat = make_latents(2, 4, 6, 6)
    raw, _ = decode_with_appsrc(c, model("taesd", "decoder"), lat)
    scaled, _ = decode_with_appsrc(c, model("taesd", "decoder"), lat * np.float32(0.18215), latent_format="sd15")
    c.need(raw is not None and scaled is not None, "decode failed")
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(raw, scaled))
    c.check(diff <= 1, "sd15 latents decode %d levels away from their raw originals" % diff)
    shifted, _ = decode_with_appsrc(c, model("taesd3", "decoder"),
                                    (make_latents(1, 16, 4, 4) - np.float32(0.0609)) * np.float32(1.5305),
                                    latent_format="sd3")
    plain, _ = decode_with_appsrc(c, model("taesd3", "decoder"), make_latents(1, 16, 4, 4))
    c.need(shifted is not None and plain is not None, "sd3 decode failed")
    d3 = int(np.abs(shifted[0].astype(int) - plain[0].astype(int)).max())
    c.check(d3 <= 1, "sd3 latents decode %d levels away from their raw originals" % d3)


def case_output_formats(c, tmp):
    lat = make_latents(1, 4, 4, 5)
    rgb, _ = decode_with_appsrc(c, model("taesd", "decoder"), lat)
    c.need(rgb is not None, "RGB decode failed")
    layouts = {"RGBA": (0, 1, 2, 3), "BGRA": (2, 1, 0, 3), "RGBx": (0, 1, 2, 3), "BGRx": (2, 1, 0, 3),
               "ARGB": (1, 2, 3, 0), "xBGR": (3, 2, 1, 0), "BGR": (2, 1, 0, None)}
    for fmt, (r, g, b, a) in layouts.items():
        frames, _ = decode_with_appsrc(c, model("taesd", "decoder"), lat, fmt=fmt)
        c.need(frames is not None, "%s decode failed" % fmt)
        f = frames[0]
        c.check(np.array_equal(f[..., [r, g, b]], rgb[0]), "%s: colour bytes differ from RGB's" % fmt)
        if a is not None:
            c.check((f[..., a] == 255).all(), "%s: alpha/padding bytes are not 255" % fmt)


def case_flush(c, tmp):
    """A flush mid-stream drops the latents staged before it; the rest decode."""
    lat = make_latents(6, 4, 4, 4)
    frames, metas = decode_with_appsrc(c, model("taesd", "decoder"), lat, per_batch=4, flush_after=1)
    c.need(frames is not None, "decode failed: %s" % metas)
    c.check([m[3] for m in metas] == [1002, 1003, 1004, 1005],
            "after a flush following latent 1, got offsets %s" % [m[3] for m in metas])


def case_errors(c, tmp):
    lat = make_latents(1, 4, 4, 4)
    frames, error = decode_with_appsrc(c, model("taesd3", "decoder"), lat)
    c.check(frames is None and error and "channels" in error and "16" in error,
            "4-channel latents into a 16-channel decoder: %s" % error)
    frames, error = decode_with_appsrc(c, model("taesd", "encoder"), lat)
    c.check(frames is None and error and "decoder" in error, "an encoder file as vaedecode's model: %s" % error)
    missing = os.path.join(tmp, "missing.safetensors")
    r = launch(["videotestsrc", "num-buffers=1", "!", "video/x-raw,format=RGB,width=64,height=64", "!",
                "vaeencode", "model=%s" % model("taesd", "encoder"), "!", "vaedecode", "model=%s" % missing, "!",
                "fakesink"], timeout=120)
    c.check(r.returncode != 0 and "missing.safetensors" in r.stderr, "a missing model: rc %d, %s"
            % (r.returncode, r.stderr[-500:]))


# A stream refused at its caps, through gst-launch-1.0: (label, pipeline, element, words of its error).
# Each gst-launch must exit with an error within REFUSAL_TIMEOUT_S, the element's error naming the cause,
# posted once (no repeat while the source retries its caps).
REFUSAL_TIMEOUT_S = 10


def refused_streams(tmp):
    l4 = os.path.join(tmp, "l4.latent")
    if not os.path.exists(l4):
        r = launch(["videotestsrc", "num-buffers=2", "!", "video/x-raw,format=RGB,width=64,height=48", "!",
                    "vaeencode", "model=%s" % model("taesd", "encoder"), "!", "latentfilesink", "location=%s" % l4],
                   timeout=120)
        assert r.returncode == 0, r.stderr[-1000:]
    video = "video/x-raw,format=RGB,width=64,height=48,interlace-mode=%s"
    return [
        ("interlace-mode=mixed into vaeencode",
         ["videotestsrc", "num-buffers=4", "!", video % "mixed", "!", "vaeencode",
          "model=%s" % model("taesd", "encoder"), "!", "fakesink"], "vaeencode0", ["Interlaced", "mixed"]),
        ("interlace-mode=interleaved into vaeencode",
         ["videotestsrc", "num-buffers=4", "!", video % "interleaved", "!", "vaeencode",
          "model=%s" % model("taesd", "encoder"), "!", "fakesink"], "vaeencode0", ["Interlaced", "interleaved"]),
        ("4-channel latents from a file into a 16-channel decoder",
         ["latentfilesrc", "location=%s" % l4, "!", "vaedecode", "model=%s" % model("taesd3", "decoder"), "!",
          "fakesink"], "vaedecode0", ["4 channels", "takes 16"]),
        ("video latents (temporal-downscale=4) into an image decoder",
         ["latentfilesrc", "location=%s" % l4, "temporal-downscale=4", "!", "vaedecode",
          "model=%s" % model("taesd", "decoder"), "!", "fakesink"], "vaedecode0",
         ["Video latents need a video decoder", "temporal-downscale=4"]),
        ("a temporal-downscale no decoder has (2)",
         ["latentfilesrc", "location=%s" % l4, "temporal-downscale=2", "!", "vaedecode",
          "model=%s" % model("taesd", "decoder"), "!", "fakesink"], "vaedecode0", ["temporal-downscale=2"]),
        ("4x4 frames into vaeencode",
         ["videotestsrc", "num-buffers=2", "!", "video/x-raw,format=RGB,width=4,height=4", "!", "vaeencode",
          "model=%s" % model("taesd", "encoder"), "!", "fakesink"], "vaeencode0",
         ["Frames are too small", "4x4"]),
    ]


def run_refused(args):
    """gst-launch-1.0 ARGS: (exit status or None on a hang, output)."""
    try:
        r = subprocess.run(["gst-launch-1.0"] + args, capture_output=True, text=True, timeout=REFUSAL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode("utf-8", "replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out
    return r.returncode, r.stdout + r.stderr


def case_refused_caps(c, tmp):
    """Caps the element cannot take: its own error, naming the cause, posted once; gst-launch exits."""
    for label, args, element, words in refused_streams(tmp):
        rc, out = run_refused(args)
        c.check(rc is not None and rc != 0, "%s: gst-launch %s" % (label, "hung" if rc is None else "exited %d" % rc))
        mine = [block for block in out.split("ERROR: from element ")[1:] if block.split(": ", 1)[0].endswith(":" + element)]
        c.check(len(mine) == 1, "%s: %d errors from %s, expected 1:\n%s" % (label, len(mine), element, out[-3000:]))
        c.check(mine and all(w in mine[0] for w in words), "%s: the error does not say %s:\n%s"
                % (label, words, out[-3000:]))
    return "%d refused streams: one error each, naming the cause" % len(refused_streams(tmp))


def case_refusal_never_hangs(c, tmp):
    """The refusals posted while gst-launch-1.0 is still setting the pipeline to PAUSED: it must see one and
    exit, every time (it hung in about 1 run in 10). GSTVAE_REFUSAL_RUNS runs of each (default 10)."""
    runs = int(os.environ.get("GSTVAE_REFUSAL_RUNS", "10"))
    streams = [s for s in refused_streams(tmp) if s[0].startswith(("interlace", "4-channel", "video latents"))]
    for label, args, element, _ in streams:
        hangs = 0
        for _ in range(runs):
            rc, out = run_refused(args)
            hangs += rc is None
        c.check(hangs == 0, "%s: gst-launch hung in %d of %d runs (%d s each)" % (label, hangs, runs,
                                                                                   REFUSAL_TIMEOUT_S))
    return "%d pipelines x %d runs: gst-launch always exited" % (len(streams), runs)


def case_preview_pipeline(c, tmp):
    """The README's preview pipeline shape: frames in, frames out, one per frame."""
    out = os.path.join(tmp, "preview.rgb")
    r = launch(["videotestsrc", "num-buffers=10", "pattern=ball", "!", "video/x-raw,format=RGB,width=128,height=96",
                "!", "vaeencode", "model=%s" % model("taesd", "encoder"), "per-batch=4", "!", "vaedecode",
                "model=%s" % model("taesd", "decoder"), "per-batch=4", "!", "videoconvert", "!",
                "video/x-raw,format=RGB", "!", "filesink", "location=%s" % out])
    c.need(r.returncode == 0, "pipeline failed: %s" % r.stderr[-1000:])
    c.check(os.path.getsize(out) == 10 * 128 * 96 * 3, "%d bytes, expected 10 frames" % os.path.getsize(out))


def case_kl_layouts(c, tmp):
    """The KL decoder in the element: every checkpoint layout gives the frames
    gst-vae-decode-file gives (the engine, cross-checked against the float64
    reference in crosscheck_decoder.py), for raw and sdxl-scaled latents."""
    import vae_reference as V
    tool = os.environ.get("GSTVAE_DECODE_TOOL")
    c.need(tool and os.path.exists(tool), "GSTVAE_DECODE_TOOL is not set to gst-vae-decode-file")
    lat = make_latents(3, 4, 5, 7, seed=9)
    npy = os.path.join(tmp, "lat.npy")
    for layout, dtype in (("ldm", "F32"), ("diffusers", "F16"), ("first_stage_model", "BF16"),
                          ("diffusers_old", "F32")):
        path = os.path.join(tmp, "kl-%s-%s.safetensors" % (layout, dtype))
        V.make_checkpoint(path, layout=layout, ch=32, mult=(1, 2, 2, 2), blocks=1, z=4, seed=11, dtype=dtype)
        for fmt, values in (("raw", lat), ("sdxl", lat * np.float32(0.13025))):
            np.save(npy, values)
            out = os.path.join(tmp, "tool.rgb")
            r = subprocess.run([tool, "--model", path, "--latents", npy, "--out", out, "--device", "cpu",
                                "--precision", "fp32", "--latent-format", fmt], capture_output=True, text=True)
            c.need(r.returncode == 0, "gst-vae-decode-file failed: %s" % r.stderr[-800:])
            want = np.fromfile(out, dtype=np.uint8).reshape(3, 40, 56, 3)
            frames, error = decode_with_appsrc(c, path, values, latent_format=fmt, per_batch=2)
            c.need(frames is not None, "%s %s: %s" % (layout, fmt, error))
            c.check(all(np.array_equal(a, b) for a, b in zip(frames, want)) and len(frames) == 3,
                    "%s (%s), %s latents: the element's frames differ from the engine's" % (layout, dtype, fmt))


def case_scaled_files(c, tmp):
    """Scaled latents in files are never read as raw: latentfilesink stores a .npy's values raw (it has no
    metadata to say otherwise), and gst-vae-decode-file honours a .safetensors' latent_format metadata as
    latentfilesrc does."""
    tool = os.environ.get("GSTVAE_DECODE_TOOL")
    c.need(tool and os.path.exists(tool), "GSTVAE_DECODE_TOOL is not set to gst-vae-decode-file")
    paths = {}
    for fmt in ("raw", "sd15"):
        for ext in ("npy", "safetensors"):
            paths[fmt, ext] = os.path.join(tmp, "%s.%s" % (fmt, ext))
        r = launch(["videotestsrc", "num-buffers=2", "!", "video/x-raw,format=RGB,width=64,height=48", "!",
                    "vaeencode", "model=%s" % model("taesd", "encoder"), "latent-format=%s" % fmt, "!", "tee",
                    "name=t", "t.", "!", "queue", "!", "latentfilesink", "location=%s" % paths[fmt, "npy"], "t.",
                    "!", "queue", "!", "latentfilesink", "location=%s" % paths[fmt, "safetensors"]], timeout=120)
        c.need(r.returncode == 0, "encoding %s latents failed: %s" % (fmt, r.stderr[-1000:]))
    raw, scaled = np.load(paths["raw", "npy"]), np.load(paths["sd15", "npy"])
    c.check(raw.shape == scaled.shape and np.allclose(scaled, raw, rtol=1e-5, atol=1e-6),
            "latent-format=sd15 into a .npy: not the raw values (max |diff| %g, ratio %g)"
            % (np.abs(scaled - raw).max(), np.abs(scaled).mean() / np.abs(raw).mean()))

    def tool_frames(path):
        out = os.path.join(tmp, "tool.rgb")
        r = subprocess.run([tool, "--model", model("taesd", "decoder"), "--latents", path, "--out", out,
                            "--device", "cpu", "--precision", "fp32"], capture_output=True, text=True)
        c.need(r.returncode == 0, "gst-vae-decode-file %s failed: %s" % (path, r.stderr[-800:]))
        return np.fromfile(out, dtype=np.uint8).astype(np.int16)

    want = tool_frames(paths["raw", "safetensors"])
    got = tool_frames(paths["sd15", "safetensors"])
    c.check(got.shape == want.shape and np.abs(got - want).max() <= 1,
            "gst-vae-decode-file on sd15.safetensors (latent_format sd15 recorded): max |diff| %d from the raw "
            "file's frames" % np.abs(got - want).max())
    return ".npy holds raw values whatever the caps' format; gst-vae-decode-file honours latent_format"


CASES = [
    ("a. real TAESD weights: gst-launch round trips within 0.2 dB of the README", case_psnr),
    ("b. 8-bit frames equal the float64 reference decoder's", case_reference),
    ("c. timestamps, durations, DISCONT and offsets carried from the latents", case_timestamps),
    ("d. per-batch and batch-timeout do not change the frames", case_batching),
    ("e. scaled latent formats are turned back into raw ones", case_scaled_formats),
    ("f. every output format carries the same colours", case_output_formats),
    ("g. a flush drops the latents staged before it", case_flush),
    ("h. errors: wrong channels, an encoder file, a missing model", case_errors),
    ("i. vaeencode ! vaedecode preview, one frame per frame", case_preview_pipeline),
    ("j. KL decoder: every layout, raw and scaled latents, equal the engine's frames", case_kl_layouts),
    ("k. refused caps: the element's own error, naming the cause, once", case_refused_caps),
    ("l. a refusal during the state change to PAUSED: gst-launch always exits", case_refusal_never_hangs),
    ("m. scaled latents in files: .npy holds raw values, gst-vae-decode-file honours latent_format",
     case_scaled_files),
]


def main():
    Gst.init(None)
    if not Gst.ElementFactory.find("vaedecode"):
        print("vaedecode not found: set GST_PLUGIN_PATH to the build's gst folder")
        sys.exit(1)
    if not os.path.exists(model("taesd", "decoder")):
        print("the TAESD weights are missing from %s" % MODELS)
        sys.exit(1)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        run_selected(CASES, (tmp,), "GSTVAE_DECODE_CASES")
    finish(t0)


if __name__ == "__main__":
    main()
