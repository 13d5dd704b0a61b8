#!/usr/bin/env python3
"""latentfilesrc pipeline tests (gst-launch-1.0 and PyGObject).

Every case prints one PASS or FAIL line; the script exits non-zero if any
failed. Environment: GST_PLUGIN_PATH (the built plugin).

  a. round trip: vaeencode -> latentfilesink -> latentfilesrc -> latentfilesink
     keeps every value for .latent, .safetensors and .npy; the caps equal
     vaeencode's; metadata (framerate, timestamps, model) carried over
  b. ComfyUI-style .latent written by hand, with and without the
     latent_format_version_0 marker (LoadLatent's 1/0.18215 rule); .safetensors
     never rescaled; latent_format metadata into the caps
  c. F16 and BF16 safetensors, '<f2' npy, 3-D tensors: float32 values
  d. timestamps, durations, DISCONT, framerate property and defaults, duration
     queries, num-buffers, start-index/num-frames
  e. seeking in TIME, BUFFERS and DEFAULT formats gives the frames from k
  f. hostile and missing files: an ERROR naming the file, gst-launch exits
     non-zero, no crash, no hang (also a file cut short while playing)
  g. memory: a 512 MB file streams with the peak RSS of a small one
  h. video latents (random Wan 2.1 weights): vaeencode ! latentfilesink then
     latentfilesrc ! vaedecode gives the frames of vaeencode ! vaedecode; the
     temporal-downscale property; 5-D ComfyUI video latents [1, C, T, h, w]

GSTVAE_LFSRC_CASES=WORD[,WORD...] runs only the cases whose name holds one of
the words.
"""
import json
import os
import shlex
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from casekit import FAILED, RAN, finish, run_selected  # noqa: E402,F401

MODEL_NAME = "tiny-vae-test.safetensors"
Z = 4
SHAPE = (7, Z, 6, 8)  # 7 frames of 64x48 video
LEGACY = 1.0 / 0.18215


# ------------------------------------------------------------------ helpers

def launch(description, timeout=120):
    """gst-launch-1.0 -m DESCRIPTION; returns (exit status, stdout+stderr)."""
    p = subprocess.run(["gst-launch-1.0", "-m"] + shlex.split(description), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def launch_ok(c, description):
    rc, out = launch(description)
    c.need(rc == 0, "gst-launch-1.0 %s exited %d:\n%s" % (description, rc, out[-3000:]))
    return out


_GST = []


def gst():
    if not _GST:
        import gi
        gi.require_version("Gst", "1.0")
        from gi.repository import Gst
        Gst.init(None)
        _GST.append(Gst)
    return _GST[0]


def safetensors_bytes(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes), written in that order."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def write(path, blob):
    with open(path, "wb") as f:
        f.write(blob)
    return path


def comfy_latent(path, values, marker=True, dtype="F32", metadata=None):
    """What ComfyUI's SaveLatent writes: latent_tensor (+ the empty marker)."""
    if dtype == "F32":
        raw = values.astype("<f4").tobytes()
    elif dtype == "F16":
        raw = values.astype("<f2").tobytes()
    else:  # BF16: the top half of each float32 (values chosen to be exact)
        raw = (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    tensors = [("latent_tensor", dtype, values.shape, raw)]
    if marker:
        tensors.insert(0, ("latent_format_version_0", "F32", (0,), b""))
    return write(path, safetensors_bytes(tensors, metadata))


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", {})
    info = header["latent_tensor"]
    a, b = info["data_offsets"]
    return np.frombuffer(blob[8 + n + a:8 + n + b], "<f4").reshape(info["shape"]), meta, header


def read_any(path):
    return np.load(path) if path.endswith(".npy") else read_safetensors(path)[0]


def run_appsink(c, description, timeout_s=60, seek=None, play=True):
    """Runs DESCRIPTION (ending in `appsink name=out`) and pulls every sample.
    seek: (format, flags, position) applied once PAUSED. Returns a dict with
    caps (string), buffers [(pts, duration, flags, offset, array bytes)],
    eos, error, messages (element message structures), durations."""
    Gst = gst()
    pipeline = Gst.parse_launch(description)
    sink = pipeline.get_by_name("out")
    sink.set_property("sync", False)
    r = {"caps": None, "buffers": [], "eos": False, "error": None, "messages": [], "durations": {}}
    bus = pipeline.get_bus()
    try:
        pipeline.set_state(Gst.State.PAUSED)
        change, _, _ = pipeline.get_state(timeout_s * Gst.SECOND)
        if change == Gst.StateChangeReturn.FAILURE:
            r["error"] = "state change failed"
        else:
            for fmt in (Gst.Format.TIME, Gst.Format.BUFFERS, Gst.Format.DEFAULT):
                ok, d = pipeline.query_duration(fmt)
                r["durations"][fmt.value_nick] = d if ok else None
            if seek is not None:
                fmt, flags, pos = seek
                r["seek"] = pipeline.seek_simple(fmt, flags, pos)
                pipeline.get_state(timeout_s * Gst.SECOND)
            if play:
                pipeline.set_state(Gst.State.PLAYING)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                sample = sink.emit("try-pull-sample", 100 * Gst.MSECOND)
                if sample is not None:
                    buf = sample.get_buffer()
                    ok, m = buf.map(Gst.MapFlags.READ)
                    data = bytes(m.data)
                    buf.unmap(m)
                    r["caps"] = sample.get_caps().to_string()
                    r["buffers"].append((buf.pts, buf.duration, int(buf.get_flags()), buf.offset, data))
                    continue
                if sink.get_property("eos"):
                    r["eos"] = True
                    break
                msg = bus.pop_filtered(Gst.MessageType.ERROR)
                if msg is not None:
                    err, debug = msg.parse_error()
                    r["error"] = "%s | %s" % (err.message, debug)
                    break
            else:
                r["error"] = r["error"] or "timeout"
        while True:
            msg = bus.pop()
            if msg is None:
                break
            if msg.type == Gst.MessageType.ERROR and r["error"] is None:
                err, debug = msg.parse_error()
                r["error"] = "%s | %s" % (err.message, debug)
            st = msg.get_structure()
            if msg.type == Gst.MessageType.ELEMENT and st is not None:
                r["messages"].append(st)
    finally:
        pipeline.set_state(Gst.State.NULL)
    return r


def frames_of(r, shape):
    return [np.frombuffer(b[4], "<f4").reshape(shape[1:]) for b in r["buffers"]]


def opened(r):
    for st in r["messages"]:
        if st.get_name() == "latentfilesrc-opened":
            return st
    return None


def pts(i, n, d):
    return i * d * 1000000000 // n


# ------------------------------------------------------------------ a

STREAM = {}


def encoded(model, tmp):
    """7 latents of 4x6x8 (64x48 at 30/1, batches of 3) as raw bytes and as the three file formats."""
    if not STREAM:
        d = os.path.join(tmp, "a")
        os.mkdir(d)
        p = {k: os.path.join(d, "clip." + k) for k in ("f32", "latent", "safetensors", "npy")}
        rc, out = launch("videotestsrc num-buffers=7 ! video/x-raw,format=RGB,width=64,height=48,framerate=30/1 "
                         "! vaeencode model=%s per-batch=3 ! tee name=t t. ! queue ! filesink location=%s" % (model, p["f32"])
                         + "".join(" t. ! queue ! latentfilesink location=%s" % p[k]
                                   for k in ("latent", "safetensors", "npy")))
        assert rc == 0, out[-3000:]
        with open(p["f32"], "rb") as f:
            STREAM["raw"] = f.read()
        STREAM.update(dir=d, paths=p)
        # vaeencode's own caps, for comparison
        r = run_appsink(None, "videotestsrc num-buffers=1 ! video/x-raw,format=RGB,width=64,height=48,"
                        "framerate=30/1 ! vaeencode model=%s ! appsink name=out" % model)
        STREAM["caps"] = r["caps"]
    return STREAM


def case_round_trip(c, model, tmp):
    s = encoded(model, tmp)
    raw = s["raw"]
    c.need(len(raw) == 4 * int(np.prod(SHAPE)), "vaeencode gave %d bytes" % len(raw))
    notes = []
    for k in ("latent", "safetensors", "npy"):
        src = s["paths"][k]
        again = os.path.join(s["dir"], "again." + k)
        launch_ok(c, "latentfilesrc location=%s ! latentfilesink location=%s" % (src, again))
        got = read_any(again)
        c.check(got.shape == SHAPE and got.tobytes() == raw,
                "%s: latentfilesrc -> latentfilesink gives %s, values equal: %s" % (k, got.shape, got.tobytes() == raw))
        r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % src)
        c.check(r["eos"] and not r["error"], "%s: appsink run: %s" % (k, r["error"]))
        c.check(b"".join(b[4] for b in r["buffers"]) == raw, "%s: the buffers differ from vaeencode's stream" % k)
        c.check(len(r["buffers"]) == 7 and all(len(b[4]) == 4 * Z * 6 * 8 for b in r["buffers"]),
                "%s: %d buffers of %s bytes" % (k, len(r["buffers"]), [len(b[4]) for b in r["buffers"]]))
        if k != "npy":
            # latentfilesink recorded the framerate and source size: the caps are vaeencode's exactly.
            c.check(r["caps"] == s["caps"], "%s: caps %s, vaeencode's %s" % (k, r["caps"], s["caps"]))
            _, meta, _ = read_safetensors(again)
            for key, want in (("framerate", "30/1"), ("first_pts_ns", "0"), ("end_pts_ns", str(pts(7, 30, 1))),
                              ("latent_format", "raw"), ("source_width", "64"), ("source_height", "48"),
                              ("model", MODEL_NAME)):
                c.check(meta.get(key) == want, "%s: round-trip metadata %s = %r, expected %r"
                        % (k, key, meta.get(key), want))
        else:
            # No metadata in .npy: 1/1, source size = latent size x 8.
            want = s["caps"].replace("framerate=(fraction)30/1", "framerate=(fraction)1/1")
            c.check(r["caps"] == want, "npy: caps %s, expected %s" % (r["caps"], want))
        notes.append(k)
    return "values identical through %s; caps equal vaeencode's (%s)" % (", ".join(notes), s["caps"])


# ------------------------------------------------------------------ b

def case_comfyui_marker(c, model, tmp):
    d = os.path.join(tmp, "b")
    os.mkdir(d)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 5, 7)).astype(np.float32)
    shape = x.shape
    with_marker = comfy_latent(os.path.join(d, "new.latent"), x, marker=True)
    without = comfy_latent(os.path.join(d, "old.latent"), x, marker=False)
    st_without = comfy_latent(os.path.join(d, "old.safetensors"), x, marker=False)

    r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % with_marker)
    c.need(r["eos"] and not r["error"], "new.latent: %s" % r["error"])
    c.check(np.array_equal(np.stack(frames_of(r, shape)), x), "new.latent: values differ from the file's")
    o = opened(r)
    c.check(o is not None and o.get_value("legacy-scale") is False, "new.latent: opened message %s" % o)
    c.check("latent-format=(string)raw" in r["caps"] and "source-width=(int)56" in r["caps"]
            and "source-height=(int)40" in r["caps"] and "channels=(int)4" in r["caps"]
            and "framerate=(fraction)1/1" in r["caps"], "new.latent caps %s" % r["caps"])

    # ComfyUI's LoadLatent: samples = latent_tensor.float() * (1.0 / 0.18215) when the marker is absent.
    import torch
    want = (torch.from_numpy(x) * LEGACY).numpy()
    r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % without)
    c.need(r["eos"] and not r["error"], "old.latent: %s" % r["error"])
    got = np.stack(frames_of(r, shape))
    c.check(np.array_equal(got, want), "old.latent: not x * 1/0.18215 as torch computes it: max |diff| %g"
            % np.abs(got - want).max())
    o = opened(r)
    c.check(o is not None and o.get_value("legacy-scale") is True and abs(o.get_value("multiplier") - LEGACY) < 1e-12,
            "old.latent: opened message does not say the rule applied: %s" % (o.to_string() if o else None))
    c.check("latent-format=(string)raw" in r["caps"], "old.latent caps %s" % r["caps"])

    r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % st_without)
    c.need(r["eos"] and not r["error"], "old.safetensors: %s" % r["error"])
    c.check(np.array_equal(np.stack(frames_of(r, shape)), x), "old.safetensors was rescaled (only .latent is)")

    # latent_format metadata of a .safetensors goes into the caps; a .latent is raw whatever it says;
    # the latent-format property overrides both.
    sdxl = comfy_latent(os.path.join(d, "sdxl.safetensors"), x, metadata={"latent_format": "sdxl", "framerate": "12/1"})
    r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % sdxl)
    c.check(r["caps"] and "latent-format=(string)sdxl" in r["caps"] and "framerate=(fraction)12/1" in r["caps"],
            "sdxl.safetensors caps %s" % r["caps"])
    c.check(np.array_equal(np.stack(frames_of(r, shape)), x), "sdxl.safetensors values changed")
    lat = comfy_latent(os.path.join(d, "says-sdxl.latent"), x, metadata={"latent_format": "sdxl"})
    r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % lat)
    c.check(r["caps"] and "latent-format=(string)raw" in r["caps"], "says-sdxl.latent caps %s" % r["caps"])
    r = run_appsink(c, "latentfilesrc location=%s latent-format=flux ! appsink name=out" % with_marker)
    c.check(r["caps"] and "latent-format=(string)flux" in r["caps"], "latent-format=flux: caps %s" % r["caps"])
    rc, out = launch("latentfilesrc location=%s latent-format=nonsense ! fakesink" % with_marker)
    c.check(rc != 0 and "nonsense" in out, "latent-format=nonsense: exit %d\n%s" % (rc, out[-1500:]))
    return "marker: as stored; no marker: x*1/0.18215 == torch's; .safetensors untouched; sdxl metadata -> caps"


# ------------------------------------------------------------------ c

def case_dtypes(c, model, tmp):
    d = os.path.join(tmp, "c")
    os.mkdir(d)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 4, 3, 5)).astype(np.float32) * 3
    # Special values: zeros, infinities, the largest half, half subnormals.
    special = np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 6.1e-5, 5.96e-8, -1e-6], np.float32)
    x.reshape(-1)[:special.size] = special
    h = x.astype(np.float16)
    notes = []
    for name, path, want in (
            ("F16 safetensors", comfy_latent(os.path.join(d, "h.latent"), x, dtype="F16"), h.astype(np.float32)),
            ("BF16 safetensors", comfy_latent(os.path.join(d, "b.latent"), x, dtype="BF16"),
             (x.view("<u4") & np.uint32(0xFFFF0000)).view("<f4")),
            ("<f2 npy", None, h.astype(np.float32))):
        if path is None:
            path = os.path.join(d, "h.npy")
            np.save(path, h)
        r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % path)
        c.need(r["eos"] and not r["error"], "%s: %s" % (name, r["error"]))
        got = np.stack(frames_of(r, want.shape))
        c.check(np.array_equal(got, want), "%s: values differ at %d places" % (name, int((got != want).sum())))
        c.check(got.tobytes() == want.tobytes(), "%s: bits differ (signed zeros?)" % name)
        c.check("format=(string)F32" in r["caps"], "%s: caps %s" % (name, r["caps"]))
        notes.append(name)
    # BF16 written by torch itself
    import torch
    tb = torch.from_numpy(x).to(torch.bfloat16)
    path = write(os.path.join(d, "torch-bf16.safetensors"),
                 safetensors_bytes([("latent_tensor", "BF16", x.shape, tb.view(torch.int16).numpy().tobytes())]))
    r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % path)
    got = np.stack(frames_of(r, x.shape))
    c.check(np.array_equal(got, tb.float().numpy()), "torch bfloat16: values differ from tensor.float()")
    # 3-D: one frame; also 3-D npy
    x3 = rng.standard_normal((16, 4, 6)).astype(np.float32)
    for path in (comfy_latent(os.path.join(d, "one.latent"), x3), os.path.join(d, "one.npy")):
        if path.endswith(".npy"):
            np.save(path, x3)
        r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % path)
        c.check(r["eos"] and len(r["buffers"]) == 1 and r["buffers"][0][4] == x3.tobytes(),
                "%s: 3-D tensor: %d buffers, %s" % (os.path.basename(path), len(r["buffers"]), r["error"]))
        c.check(r["caps"] and "channels=(int)16" in r["caps"] and "width=(int)6" in r["caps"]
                and "height=(int)4" in r["caps"], "3-D caps %s" % r["caps"])
    return ", ".join(notes) + ", torch bfloat16, 3-D (.latent and .npy): exact float32"


# ------------------------------------------------------------------ d

def case_timestamps(c, model, tmp):
    d = os.path.join(tmp, "d")
    os.mkdir(d)
    x = np.arange(5 * 2 * 2 * 3, dtype=np.float32).reshape(5, 2, 2, 3)
    path = comfy_latent(os.path.join(d, "t.latent"), x)
    for fps, (n, dd) in (("24/1", (24, 1)), ("30000/1001", (30000, 1001)), (None, (1, 1))):
        prop = " framerate=%s" % fps if fps else ""
        r = run_appsink(c, "latentfilesrc location=%s%s ! appsink name=out" % (path, prop))
        c.need(r["eos"] and not r["error"] and len(r["buffers"]) == 5, "%s: %s, %d buffers" % (fps, r["error"],
                                                                                         len(r["buffers"])))
        want_pts = [pts(i, n, dd) for i in range(5)]
        want_dur = [pts(i + 1, n, dd) - pts(i, n, dd) for i in range(5)]
        c.check([b[0] for b in r["buffers"]] == want_pts, "%s: PTS %s, expected %s" % (fps, [b[0] for b in r["buffers"]],
                                                                                       want_pts))
        c.check([b[1] for b in r["buffers"]] == want_dur, "%s: durations %s" % (fps, [b[1] for b in r["buffers"]]))
        c.check([b[3] for b in r["buffers"]] == list(range(5)), "%s: offsets %s" % (fps, [b[3] for b in r["buffers"]]))
        Gst = gst()
        discont = [bool(b[2] & int(Gst.BufferFlags.DISCONT)) for b in r["buffers"]]
        c.check(discont == [True, False, False, False, False], "%s: DISCONT flags %s" % (fps, discont))
        c.check(r["caps"] and "framerate=(fraction)%d/%d" % (n, dd) in r["caps"], "%s: caps %s" % (fps, r["caps"]))
        c.check(r["durations"] == {"time": pts(5, n, dd), "buffers": 5, "default": 5},
                "%s: duration queries %s" % (fps, r["durations"]))
        c.check(np.array_equal(np.stack(frames_of(r, x.shape)), x), "%s: values" % fps)
    # basesrc's num-buffers, and start-index / num-frames
    r = run_appsink(c, "latentfilesrc location=%s num-buffers=3 ! appsink name=out" % path)
    c.check(r["eos"] and len(r["buffers"]) == 3, "num-buffers=3: %d buffers, %s" % (len(r["buffers"]), r["error"]))
    r = run_appsink(c, "latentfilesrc location=%s start-index=1 num-frames=3 framerate=10/1 ! appsink name=out" % path)
    c.check(r["eos"] and [b[0] for b in r["buffers"]] == [0, 100000000, 200000000]
            and np.array_equal(np.stack(frames_of(r, x.shape)), x[1:4]) and r["durations"]["buffers"] == 3,
            "start-index=1 num-frames=3: PTS %s, durations %s, %s" % ([b[0] for b in r["buffers"]], r["durations"],
                                                                      r["error"]))
    rc, out = launch("latentfilesrc location=%s start-index=6 ! fakesink" % path)
    c.check(rc != 0 and "start-index" in out, "start-index past the end: exit %d" % rc)
    return "24/1, 30000/1001, default 1/1: PTS, durations, offsets, one DISCONT, durations queried; num-buffers"


# ------------------------------------------------------------------ e

def case_seek(c, model, tmp):
    d = os.path.join(tmp, "e")
    os.mkdir(d)
    x = np.arange(12 * 1 * 2 * 2, dtype=np.float32).reshape(12, 1, 2, 2)
    path = comfy_latent(os.path.join(d, "s.latent"), x)
    Gst = gst()
    flush = Gst.SeekFlags.FLUSH | Gst.SeekFlags.ACCURATE
    k = 7
    notes = []
    for label, fmt, pos in (("TIME", Gst.Format.TIME, pts(k, 30, 1)),
                            ("TIME mid-frame", Gst.Format.TIME, pts(k, 30, 1) + 10000000),
                            ("BUFFERS", Gst.Format.BUFFERS, k), ("DEFAULT", Gst.Format.DEFAULT, k)):
        r = run_appsink(c, "latentfilesrc location=%s framerate=30/1 ! appsink name=out" % path,
                        seek=(fmt, flush, pos))
        c.need(r.get("seek") and r["eos"] and not r["error"], "%s: seek %s, %s" % (label, r.get("seek"), r["error"]))
        got = frames_of(r, x.shape)
        c.check(len(got) == 12 - k and all(np.array_equal(g, x[k + i]) for i, g in enumerate(got)),
                "%s: %d frames after the seek, first %s, expected frames %d.." % (label, len(got),
                                                                                 got[0].ravel() if got else None, k))
        c.check(r["buffers"] and r["buffers"][0][0] == pts(k, 30, 1)
                and bool(r["buffers"][0][2] & int(Gst.BufferFlags.DISCONT)),
                "%s: first buffer PTS %s flags %s" % (label, r["buffers"][0][0] if r["buffers"] else None,
                                                      r["buffers"][0][2] if r["buffers"] else None))
        notes.append(label)
    # A seek with a stop: frames k .. 9 only.
    Gst = gst()
    pipeline = Gst.parse_launch("latentfilesrc location=%s framerate=30/1 ! appsink name=out sync=false" % path)
    sink = pipeline.get_by_name("out")
    pipeline.set_state(Gst.State.PAUSED)
    pipeline.get_state(30 * Gst.SECOND)
    ok = pipeline.seek(1.0, Gst.Format.BUFFERS, flush, Gst.SeekType.SET, 3, Gst.SeekType.SET, 6)
    pipeline.set_state(Gst.State.PLAYING)
    seen = [sample.get_buffer().offset for sample in pull_until_eos(sink)]
    pipeline.set_state(Gst.State.NULL)
    c.check(ok and seen == [3, 4, 5], "BUFFERS seek 3..6: frames %s (seek %s)" % (seen, ok))
    reverse = reverse_seek_refused(c, path)
    return "seek to frame %d in %s; BUFFERS 3..6 gives 3,4,5; %s" % (k, ", ".join(notes), reverse)


def pull_until_eos(sink, timeout_s=30):
    """The samples an appsink gets until EOS (or `timeout_s`)."""
    Gst = gst()
    samples = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sample = sink.emit("try-pull-sample", 100 * Gst.MSECOND)
        if sample is not None:
            samples.append(sample)
        elif sink.get_property("eos"):
            break
    return samples


def reverse_seek_refused(c, path):
    """A reverse seek is refused before anything is flushed: the stream goes on from where it was, every
    sample still in the TIME segment (a refusal after the flush left the data with no segment)."""
    Gst = gst()
    pipeline = Gst.parse_launch("latentfilesrc location=%s framerate=30/1 ! appsink name=out sync=false" % path)
    sink = pipeline.get_by_name("out")
    flushes = []

    def count_flushes(pad, info):
        if info.get_event().type in (Gst.EventType.FLUSH_START, Gst.EventType.FLUSH_STOP):
            flushes.append(info.get_event().type.value_nick)
        return Gst.PadProbeReturn.OK

    sink.get_static_pad("sink").add_probe(Gst.PadProbeType.EVENT_BOTH | Gst.PadProbeType.EVENT_FLUSH, count_flushes)
    pipeline.set_state(Gst.State.PAUSED)
    pipeline.get_state(30 * Gst.SECOND)
    ok = pipeline.seek(-1.0, Gst.Format.TIME, Gst.SeekFlags.FLUSH, Gst.SeekType.SET, 0, Gst.SeekType.SET,
                       pts(6, 30, 1))
    pipeline.set_state(Gst.State.PLAYING)
    samples = pull_until_eos(sink)
    seen = [sample.get_buffer().offset for sample in samples]
    formats = {sample.get_segment().format.value_nick for sample in samples}
    msg = pipeline.get_bus().pop_filtered(Gst.MessageType.ERROR)
    pipeline.set_state(Gst.State.NULL)
    c.check(not ok, "a reverse seek was accepted")
    c.check(flushes == [], "the refused reverse seek flushed downstream: %s" % flushes)
    c.check(seen == list(range(12)) and formats == {"time"},
            "after the refused reverse seek: frames %s, segment formats %s" % (seen, formats))
    c.check(msg is None, "after the refused reverse seek: %s" % (msg.parse_error() if msg else None))
    return "a reverse seek refused with no flush, all 12 frames in the TIME segment"


# ------------------------------------------------------------------ f

def npy_bytes(descr, shape, data, version=1):
    text = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (descr, ", ".join(str(v) for v in shape)
                                                                        + ("," if len(shape) == 1 else ""))
    text += " " * ((64 - (len(text) + 11) % 64) % 64) + "\n"
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode() + data
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(text)) + text.encode() + data


def non_utf8_metadata_latent(values):
    """A .latent whose metadata holds the Latin-1 byte 0xE9 (json.dumps would escape it)."""
    blob = safetensors_bytes([("latent_tensor", "F32", values.shape, values.tobytes())], {"model": "cafX"})
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = blob[8:8 + n].replace(b"cafX", b"caf\xe9")
    return blob[:8] + header + blob[8 + n:]


def case_hostile(c, model, tmp):
    d = os.path.join(tmp, "f")
    os.mkdir(d)
    x = np.ones((2, 4, 3, 5), np.float32)
    good = comfy_latent(os.path.join(d, "good.latent"), x)
    with open(good, "rb") as f:
        blob = f.read()
    lat = lambda shape, raw, dtype="F32": safetensors_bytes([("latent_tensor", dtype, shape, raw)])  # noqa: E731
    fifo = os.path.join(d, "pipe.latent")
    os.mkfifo(fifo)
    os.mkdir(os.path.join(d, "adir.latent"))
    cases = {
        "missing.latent": (None, "not found"),
        "adir.latent": (None, "directory"),
        "pipe.latent": (None, "not a regular file"),
        "empty.latent": (b"", "empty"),
        "truncated.latent": (blob[:-7], None),
        "header-only.safetensors": (blob[:40], None),
        "lying.latent": (lat((2, 4, 3, 500), x.tobytes()), None),
        "huge.latent": (safetensors_bytes([("latent_tensor", "F32", (1 << 20, 1 << 20, 1 << 10, 1 << 10), b"")]),
                        None),
        "huge.npy": (npy_bytes("<f4", (1000000000, 4, 10000, 10000), b"\0" * 64), None),
        "lying.npy": (npy_bytes("<f4", (3, 4, 3, 5), x.tobytes()), "truncated"),
        "six-d.npy": (npy_bytes("<f4", (1, 1, 2, 4, 3, 5), x.tobytes()), "N x C x h x w"),
        # 5-D is one video (1 x C x T x h x w): a batch of videos is refused, naming the shape.
        "video-batch.latent": (lat((2, 4, 1, 3, 5), x.tobytes()), "[2, 4, 1, 3, 5] is a batch of 2 videos"),
        "video-batch.npy": (npy_bytes("<f4", (2, 4, 1, 3, 5), x.tobytes()), "[2, 4, 1, 3, 5] is a batch of 2 videos"),
        "two-d.latent": (lat((12, 10), x.tobytes()), "N x C x h x w"),
        "int32.latent": (lat((2, 4, 3, 5), x.tobytes(), "I32"), "I32"),
        "zero-channels.latent": (lat((2, 0, 3, 5), b""), "outside"),
        "no-tensor.safetensors": (safetensors_bytes([("samples", "F32", (2, 4, 3, 5), x.tobytes())]), "latent_tensor"),
        "pickle.latent": (b"\x80\x04\x95" + b"\0" * 60, "pickle"),
        "zip.latent": (b"PK\x03\x04" + b"\0" * 60, "pickle"),
        "big-endian.npy": (npy_bytes(">f4", (2, 4, 3, 5), x.tobytes()), ">f4"),
        "npy-v2-huge-header.npy": (b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + b"{", "limit"),
        "not-json.latent": (struct.pack("<Q", 10) + b"{not json}", "JSON"),
        # Metadata that is not UTF-8 (a Latin-1 'cafe'): the reason must survive (GStreamer drops an
        # error's debug text that is not valid UTF-8).
        "non-utf8-metadata.latent": (non_utf8_metadata_latent(x), "UTF-8 byte"),
    }
    failures = []
    for name, (content, word) in cases.items():
        path = os.path.join(d, name)
        if content is not None:
            write(path, content)
        t0 = time.monotonic()
        try:
            rc, out = launch("latentfilesrc location=%s ! fakesink" % path, timeout=60)
        except subprocess.TimeoutExpired:
            failures.append("%s: gst-launch hung (60 s)" % name)
            continue
        err = [l for l in out.splitlines() if l.startswith("ERROR") or "Additional debug info" in l]
        problems = []
        if rc == 0:
            problems.append("exit 0")
        if rc < 0 or "Segmentation" in out or "Aborted" in out or "terminate called" in out:
            problems.append("crashed (%d)" % rc)
        if not any(l.startswith("ERROR: from element") and "latentfilesrc" in l for l in out.splitlines()):
            problems.append("no ERROR from latentfilesrc")
        if path not in out:
            problems.append("the error does not name the file")
        if word and word not in out:
            problems.append("the error does not say %r" % word)
        if problems:
            failures.append("%s: %s (%.1f s)\n%s" % (name, ", ".join(problems), time.monotonic() - t0,
                                                     "\n".join(out.splitlines()[-8:])))
    c.check(not failures, "\n".join(failures))

    # A file cut short after it was opened (prerolled on frame 0): a read error, not a crash.
    Gst = gst()
    cut = comfy_latent(os.path.join(d, "cut.latent"), np.ones((6, 4, 8, 8), np.float32))
    pipeline = Gst.parse_launch("latentfilesrc location=%s ! appsink name=out sync=false max-buffers=1" % cut)
    pipeline.set_state(Gst.State.PAUSED)
    pipeline.get_state(30 * Gst.SECOND)
    os.truncate(cut, os.path.getsize(cut) - 3 * 4 * 4 * 8 * 8)
    pipeline.set_state(Gst.State.PLAYING)
    sink = pipeline.get_by_name("out")
    for _ in range(10):
        sink.emit("try-pull-sample", 100 * Gst.MSECOND)
    msg = pipeline.get_bus().timed_pop_filtered(30 * Gst.SECOND, Gst.MessageType.ERROR | Gst.MessageType.EOS)
    pipeline.set_state(Gst.State.NULL)
    c.check(msg is not None and msg.type == Gst.MessageType.ERROR and cut in msg.parse_error()[1]
            and "truncated" in msg.parse_error()[1],
            "file cut while playing: %s" % (str(msg.parse_error()) if msg and msg.type == Gst.MessageType.ERROR
                                             else msg))
    rc, out = launch("latentfilesrc ! fakesink")
    c.check(rc != 0 and "location" in out, "no location: exit %d" % rc)
    return "%d hostile/missing files: ERROR naming the file, non-zero exit; cut while playing: read error" % len(cases)


# ------------------------------------------------------------------ h. video latents

WAN = {}
WAN_CAPS = "video/x-raw,format=RGB,width=64,height=48,framerate=24/1"
WAN_FRAMES = 9  # -> 3 latents (1 + 4 + 4 frames) -> 9 frames decoded


def wan_clip(c, tmp):
    """A random Wan 2.1 checkpoint (dim 8, encoder + decoder) and 9 frames through it: the latents (raw bytes,
    caps), the frames `vaeencode ! vaedecode` gives directly, and the latents as w.latent and w.npy."""
    if not WAN:
        d = os.path.join(tmp, "h")
        os.mkdir(d)
        wan = os.path.join(d, "wan21-test.safetensors")
        p = subprocess.run([sys.executable, os.path.join(HERE, "wan_weights.py"), "--variant", "2.1", "--dim", "8",
                            "--with-decoder", "--out", wan], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=300)
        c.need(p.returncode == 0, "wan_weights.py exited %d:\n%s" % (p.returncode, p.stdout.decode()[-2000:]))
        src = "videotestsrc num-buffers=%d ! %s ! vaeencode model=%s" % (WAN_FRAMES, WAN_CAPS, wan)
        lat, npy = os.path.join(d, "w.latent"), os.path.join(d, "w.npy")
        launch_ok(c, "%s ! tee name=t t. ! queue ! latentfilesink location=%s t. ! queue ! latentfilesink "
                  "location=%s" % (src, lat, npy))
        latents = run_appsink(c, "%s ! appsink name=out" % src, timeout_s=300)
        c.need(latents["eos"] and not latents["error"], "vaeencode alone: %s" % latents["error"])
        direct = run_appsink(c, "%s ! vaedecode model=%s ! appsink name=out" % (src, wan), timeout_s=300)
        c.need(direct["eos"] and not direct["error"], "vaeencode ! vaedecode: %s" % direct["error"])
        WAN.update(dir=d, model=wan, latent=lat, npy=npy, caps=latents["caps"],
                   raw=b"".join(b[4] for b in latents["buffers"]), direct=direct)
    return WAN


def decoded(c, w, description, label):
    """`description ! vaedecode ! appsink`: the frames' bytes, their caps and the run."""
    r = run_appsink(c, "%s ! vaedecode model=%s ! appsink name=out" % (description, w["model"]), timeout_s=300)
    c.need(r["eos"] and not r["error"], "%s: %s" % (label, r["error"]))
    return [b[4] for b in r["buffers"]], r["caps"], r


def case_wan_round_trip(c, model, tmp):
    """vaeencode ! latentfilesink, then latentfilesrc ! vaedecode: the frames vaeencode ! vaedecode gives."""
    w = wan_clip(c, tmp)
    direct = [b[4] for b in w["direct"]["buffers"]]
    c.need(len(w["raw"]) == 3 * 16 * 6 * 8 * 4, "vaeencode gave %d bytes, expected 3 latents of 16x6x8" % len(w["raw"]))
    c.need(len(direct) == 1 + 4 * 2, "vaeencode ! vaedecode gave %d frames, expected 9" % len(direct))
    c.check("temporal-downscale=(int)4" in w["caps"], "vaeencode's caps %s" % w["caps"])
    # The file's latents, caps and the opened message.
    r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % w["latent"])
    c.need(r["eos"] and not r["error"], "w.latent: %s" % r["error"])
    c.check(b"".join(b[4] for b in r["buffers"]) == w["raw"], "w.latent: the latents differ from vaeencode's")
    c.check(r["caps"] == w["caps"], "w.latent: caps %s, vaeencode's %s" % (r["caps"], w["caps"]))
    o = opened(r)
    c.check(o is not None and o.get_value("temporal-downscale") == 4
            and o.get_value("temporal-downscale-from") == "file",
            "w.latent: opened message %s" % (o.to_string() if o else None))
    discont = [bool(b[2] & int(gst().BufferFlags.DISCONT)) for b in r["buffers"]]
    c.check(discont == [True, False, False], "w.latent: DISCONT flags %s (one clip)" % discont)
    # Decoded: the same frames, bytes and caps as directly.
    frames, caps, _ = decoded(c, w, "latentfilesrc location=%s" % w["latent"], "w.latent")
    c.check(len(frames) == len(direct) and frames == direct,
            "latentfilesrc ! vaedecode: %d frames, %s, expected the %d of vaeencode ! vaedecode"
            % (len(frames), "equal" if frames == direct else "bytes differ", len(direct)))
    c.check(caps == w["direct"]["caps"], "decoded caps %s, directly %s" % (caps, w["direct"]["caps"]))
    # The frames' times, durations and offsets are the live round trip's: latent 0 covers one video frame,
    # every later latent 4 (not latent k at k / framerate).
    _, _, run = decoded(c, w, "latentfilesrc location=%s" % w["latent"], "w.latent")
    got = [(b[0], b[1], b[3]) for b in run["buffers"]]
    want = [(b[0], b[1], b[3]) for b in w["direct"]["buffers"]]
    c.check(got == want, "latentfilesrc ! vaedecode (pts, duration, offset):\n  %s\nvaeencode ! vaedecode:\n  %s"
            % (got, want))
    latent_times = [(b[0], b[1], b[3]) for b in r["buffers"]]
    frame = 1000000000 // 24
    c.check([t[2] for t in latent_times] == [0, 1, 5] and latent_times[0][1] in (frame, frame + 1),
            "w.latent's latents (pts, duration, offset) %s: latent 0 should cover one frame" % latent_times)
    return "9 frames -> 3 latents -> w.latent -> 9 frames byte-identical to vaeencode ! vaedecode (%s)" % caps


def case_temporal_property(c, model, tmp):
    """A file that does not say (.npy): temporal-downscale=4 makes it a clip; 1 makes a video file images."""
    w = wan_clip(c, tmp)
    direct = [b[4] for b in w["direct"]["buffers"]]
    r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % w["npy"])
    c.check(r["caps"] and "temporal-downscale" not in r["caps"], ".npy without the property: caps %s" % r["caps"])
    frames, caps, _ = decoded(c, w, "latentfilesrc location=%s framerate=6/1 temporal-downscale=4" % w["npy"],
                              ".npy temporal-downscale=4")
    c.check(frames == direct, ".npy temporal-downscale=4: %d frames, %s, expected the %d of vaeencode ! vaedecode"
            % (len(frames), "equal" if frames == direct else "bytes differ", len(direct)))
    c.check(caps == w["direct"]["caps"], ".npy temporal-downscale=4: decoded caps %s, directly %s"
            % (caps, w["direct"]["caps"]))
    # Image latents: one frame each.
    r = run_appsink(c, "latentfilesrc location=%s temporal-downscale=1 ! appsink name=out" % w["latent"])
    c.check(r["caps"] and "temporal-downscale" not in r["caps"] and "framerate=(fraction)6/1" in r["caps"],
            "w.latent temporal-downscale=1: caps %s" % r["caps"])
    c.check(opened(r) is not None and opened(r).get_value("temporal-downscale-from") == "property",
            "temporal-downscale=1: opened message %s" % opened(r))
    frames, _, _ = decoded(c, w, "latentfilesrc location=%s temporal-downscale=1" % w["latent"], "temporal-downscale=1")
    c.check(len(frames) == 3, "w.latent temporal-downscale=1: %d frames, expected 3 (one per latent)" % len(frames))
    r = run_appsink(c, "latentfilesrc location=%s temporal-downscale=2 ! appsink name=out" % w["npy"])
    c.check(r["caps"] and "temporal-downscale=(int)2" in r["caps"], "temporal-downscale=2: caps %s" % r["caps"])
    rc, out = launch("latentfilesrc location=%s temporal-downscale=-1 ! fakesink" % w["npy"])
    c.check(rc != 0 or "temporal-downscale" in out, "temporal-downscale=-1 accepted silently")
    return ".npy + temporal-downscale=4 decodes as the clip; temporal-downscale=1 gives 3 image frames"


def case_five_d(c, model, tmp):
    """ComfyUI's video LATENT: latent_tensor [1, C, T, h, w] is T latents, temporal-downscale=4 by default."""
    w = wan_clip(c, tmp)
    d = os.path.join(tmp, "h5")
    os.mkdir(d)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 16, 5, 3, 4)).astype(np.float32)  # [1, C, T, h, w]
    want = [np.ascontiguousarray(x[0, :, t]) for t in range(5)]
    lat = comfy_latent(os.path.join(d, "video.latent"), x)
    npy = os.path.join(d, "video.npy")
    np.save(npy, x)
    notes = []
    for path in (lat, npy):
        name = os.path.basename(path)
        r = run_appsink(c, "latentfilesrc location=%s ! appsink name=out" % path)
        c.need(r["eos"] and not r["error"], "%s: %s" % (name, r["error"]))
        got = [np.frombuffer(b[4], "<f4").reshape(16, 3, 4) for b in r["buffers"]]
        c.check(len(got) == 5 and all(np.array_equal(g, t) for g, t in zip(got, want)),
                "%s: %d latents, values %s (expected latent t = tensor[0, :, t])"
                % (name, len(got), [bool(np.array_equal(g, t)) for g, t in zip(got, want)]))
        c.check(r["caps"] and "temporal-downscale=(int)4" in r["caps"] and "channels=(int)16" in r["caps"]
                and "width=(int)4" in r["caps"] and "height=(int)3" in r["caps"]
                and "framerate=(fraction)1/1" in r["caps"], "%s: caps %s" % (name, r["caps"]))
        o = opened(r)
        c.check(o is not None and o.get_value("stored-dims") == 5 and o.get_value("file-frames") == 5
                and o.get_value("temporal-downscale-from") == "5-d", "%s: opened %s" % (name, o.to_string() if o else None))
        discont = [bool(b[2] & int(gst().BufferFlags.DISCONT)) for b in r["buffers"]]
        c.check(discont == [True] + [False] * 4, "%s: DISCONT flags %s" % (name, discont))
        notes.append(name)
    # The property overrides: 1 = image latents, 2 = two frames per latent.
    for td, field in ((1, None), (2, "temporal-downscale=(int)2")):
        r = run_appsink(c, "latentfilesrc location=%s temporal-downscale=%d ! appsink name=out" % (lat, td))
        c.check(r["caps"] and (field in r["caps"] if field else "temporal-downscale" not in r["caps"]),
                "temporal-downscale=%d: caps %s" % (td, r["caps"]))
    # Wan's latents as ComfyUI saves them (5-D) decode to the clip vaeencode ! vaedecode gives.
    wl = np.frombuffer(w["raw"], "<f4").reshape(3, 16, 6, 8)
    comfy = comfy_latent(os.path.join(d, "wan-comfy.latent"), np.ascontiguousarray(wl.transpose(1, 0, 2, 3)[None]))
    frames, _, _ = decoded(c, w, "latentfilesrc location=%s" % comfy, "wan-comfy.latent")
    direct = [b[4] for b in w["direct"]["buffers"]]
    c.check(frames == direct, "wan-comfy.latent [1, 16, 3, 6, 8]: %d frames, %s, expected the %d of vaeencode ! "
            "vaedecode" % (len(frames), "equal" if frames == direct else "bytes differ", len(direct)))
    return "%s: 5 latents of 16x3x4 = tensor[0, :, t], temporal-downscale=4; overrides; Wan [1,16,3,6,8] " \
           "decodes to the 9 frames" % ", ".join(notes)


# ------------------------------------------------------------------ g

PEAK_RSS = r"""
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_kb(c, argv):
    """(exit status, peak RSS in kB) of one gst-launch-1.0 run, measured in a fresh wrapper process."""
    p = subprocess.run([sys.executable, "-c", PEAK_RSS] + argv, stdout=subprocess.PIPE, timeout=400)
    rc, kb = p.stdout.decode().split()
    return int(rc), int(kb)


def case_memory(c, model, tmp):
    """Frames are read one at a time: a 512 MB file (sparse: zeros cost no disk) needs no more memory than
    a small one."""
    d = os.path.join(tmp, "g")
    os.mkdir(d)
    frame = (16, 64, 128)  # 512 KiB per frame
    sizes = {}
    for name, frames in (("small", 4), ("large", 1024)):
        path = os.path.join(d, name + ".latent")
        nbytes = frames * 4 * int(np.prod(frame))
        blob = safetensors_bytes([("latent_format_version_0", "F32", (0,), b""),
                                  ("latent_tensor", "F32", (frames,) + frame, b"")])
        # safetensors_bytes wrote offsets [0, 0]: patch in the real end, then extend the file sparsely.
        blob = blob.replace(b'"data_offsets": [0, 0]}}', b'"data_offsets": [0, %d]}}' % nbytes)
        text = blob[8:].rstrip(b" ")
        text += b" " * ((8 - len(text) % 8) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + nbytes)
        rc, kb = peak_rss_kb(c, ["gst-launch-1.0", "latentfilesrc", "location=" + path, "!", "fakesink"])
        c.need(rc == 0, "%s: gst-launch exited %d" % (name, rc))
        sizes[name] = kb
    grown = sizes["large"] - sizes["small"]
    c.check(grown < 64 * 1024, "peak RSS %d kB for 2 MB, %d kB for 512 MB: the file is not read frame by frame"
            % (sizes["small"], sizes["large"]))
    return "peak RSS %d MB (2 MB file) vs %d MB (512 MB file)" % (sizes["small"] // 1024, sizes["large"] // 1024)


# ------------------------------------------------------------------ main

def main():
    import vae_reference as V

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gstvae-lfsrc-") as tmp:
        model = os.path.join(tmp, MODEL_NAME)
        V.make_checkpoint(model, layout="ldm", ch=32, mult=(1, 2, 2, 2), blocks=1, z=Z, seed=11)
        cases = [
            ("a. round trip vaeencode -> latentfilesink -> latentfilesrc -> latentfilesink (.latent/.safetensors/.npy)",
             case_round_trip),
            ("b. ComfyUI .latent with and without the marker (LoadLatent 1/0.18215), latent_format", case_comfyui_marker),
            ("c. F16, BF16, <f2 npy, 3-D tensors", case_dtypes),
            ("d. timestamps, durations, framerate, duration queries, num-buffers, start-index", case_timestamps),
            ("e. seeking in TIME, BUFFERS, DEFAULT", case_seek),
            ("f. hostile, missing and cut files: ERROR naming the file", case_hostile),
            ("g. a 512 MB file streams in the memory of a small one", case_memory),
            ("h. Wan latents through latentfilesink and latentfilesrc decode as vaeencode ! vaedecode",
             case_wan_round_trip),
            ("h. temporal-downscale property: 4 for a file that does not say, 1 for images", case_temporal_property),
            ("h. 5-D ComfyUI video latents [1, C, T, h, w]", case_five_d),
        ]
        run_selected(cases, (model, tmp), "GSTVAE_LFSRC_CASES")
    finish(t0)


if __name__ == "__main__":
    main()
