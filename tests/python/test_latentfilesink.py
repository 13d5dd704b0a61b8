#!/usr/bin/env python3
"""latentfilesink pipeline tests (gst-launch-1.0 and PyGObject).

Every case prints one PASS or FAIL line; the script exits non-zero if any
failed. Environment: GST_PLUGIN_PATH (the built plugin), GSTVAE_LATENT_INFO
(the C++ reader tools/gst-vae-latent-info) and, optionally,
GSTVAE_PROGRESS_EXAMPLE (the built examples/c/progress).

  a. bit-exact: .latent, .safetensors, .npy (and format=npy on another name)
     hold exactly the bytes vaeencode streams, read back by Python and by C++
  b. the files follow ComfyUI's SaveLatent/LoadLatent layout; metadata
  c. segments by max-frames and max-duration: sizes, names, timestamps
  d. SIGKILL mid-stream leaves no final file; a finished run leaves no temp
     file; SIGINT without -e finishes the file
  e. errors: missing or non-directory parent, write failure, size changes
  f. the examples in examples/ run
  g. fixed defects: max-frames/max-duration set in PLAYING on a plain
     location, location that is a directory, extension case, umask, source
     size changes and flushing seeks (segments or "ranges" metadata),
     leftover temporary files, capture_latents.py --frames 0
  h. video latents (random Wan 2.1 weights): temporal_downscale recorded at the
     top level or per range; a temporal-downscale change starts a range/segment

GSTVAE_LFS_CASES=WORD[,WORD...] runs only the cases whose name holds one of
the words (for quick local runs).
"""
import glob
import json
import os
import re
import resource
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
EXAMPLE_PY = os.path.join(ROOT, "examples", "python", "capture_latents.py")
PYTHON = sys.executable or "/usr/bin/python3"
MODEL_NAME = "tiny-vae-test.safetensors"
Z = 4  # latent channels of the test model
NS30 = [i * 1000000000 // 30 for i in range(200)]  # videotestsrc PTS at 30/1 (rounded down, as it does)

from casekit import FAILED, RAN, Case, CheckFailed, finish, run_case, run_selected  # noqa: F401


# ------------------------------------------------------------------ helpers

def launch(description, preexec_fn=None, timeout=300):
    """gst-launch-1.0 -m DESCRIPTION; returns (exit status, stdout+stderr)."""
    p = subprocess.run(["gst-launch-1.0", "-m"] + shlex.split(description), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout, preexec_fn=preexec_fn)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def excerpt(out, chars=2500):
    """The end of a gst-launch-1.0 -m log without the state-change and progress chatter."""
    keep = [l for l in out.splitlines() if not l.startswith("Got message #") or "latentfilesink-file-closed" in l]
    return "\n".join(keep)[-chars:]


def launch_ok(c, description, **kw):
    rc, out = launch(description, **kw)
    c.need(rc == 0, "gst-launch-1.0 exited %d:\n%s" % (rc, excerpt(out, 3000)))
    return out


def closed_messages(out, element):
    """The latentfilesink-file-closed messages of one element: (location, frames, first-pts, end-pts)."""
    pat = re.compile(r'from element "%s" \(element\): latentfilesink-file-closed, location=\(string\)(\S+?), '
                     r'frames=\(guint64\)(\d+), first-pts=\(guint64\)(\d+), end-pts=\(guint64\)(\d+);'
                     % re.escape(element))
    return [(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))) for m in pat.finditer(out)]


def read_safetensors(path):
    """Own parser: (header without __metadata__, metadata, {name: array}, json length, data length)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    data = blob[8 + n:]
    tensors = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            raise ValueError("%s: tensor %s is %s, not F32" % (path, name, info["dtype"]))
        a, b = info["data_offsets"]
        tensors[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"])
    return header, meta, tensors, n, len(data)


def read_latent_py(path, npy=False):
    """N x C x h x w float32 from any of the three formats (numpy.load for .npy)."""
    if npy or path.endswith(".npy"):
        return np.load(path)
    return read_safetensors(path)[2]["latent_tensor"]


def read_latent_cpp(c, path, tmp):
    """The C++ reader's view: (raw bytes, printed text)."""
    tool = os.environ.get("GSTVAE_LATENT_INFO")
    c.need(tool and os.access(tool, os.X_OK), "GSTVAE_LATENT_INFO does not name the gst-vae-latent-info tool")
    out = os.path.join(tmp, os.path.basename(path) + ".cpp.f32")
    p = subprocess.run([tool, path, "--raw", out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    text = p.stdout.decode("utf-8", "replace")
    c.need(p.returncode == 0, "gst-vae-latent-info %s exited %d: %s" % (path, p.returncode, text))
    with open(out, "rb") as f:
        return f.read(), text


def temp_files(directory, name):
    return glob.glob(os.path.join(directory, "." + name + ".*"))


def src_caps(w, h, fps="30/1"):
    return "video/x-raw,format=RGB,width=%d,height=%d,framerate=%s" % (w, h, fps)


def encode(model, frames, w, h, per_batch, fps="30/1"):
    return ("videotestsrc num-buffers=%d ! %s ! vaeencode model=%s per-batch=%d"
            % (frames, src_caps(w, h, fps), model, per_batch))


def diff_text(a, b):
    a, b = np.frombuffer(a, "<f4"), np.frombuffer(b, "<f4")
    if a.size != b.size:
        return "%d floats vs %d" % (a.size, b.size)
    return "max |diff| %g, %d values differ" % (np.abs(a - b).max(), int((a != b).sum()))


# ------------------------------------------------------------------ a, b

STREAM = {}


def main_stream(model, tmp):
    """7 frames of 64x48 in batches of 3 -> raw stream + 4 latentfilesink branches (run once)."""
    if not STREAM:
        d = os.path.join(tmp, "a")
        os.mkdir(d)
        p = {k: os.path.join(d, "clip." + k) for k in ("f32", "latent", "safetensors", "npy")}
        p["forced"] = os.path.join(d, "forced.bin")
        out = launch_ok(Case(), encode(model, 7, 64, 48, 3) +
                        " ! tee name=t t. ! queue ! filesink location=%s" % p["f32"] +
                        "".join(" t. ! queue ! latentfilesink name=%s location=%s" % (k, p[k])
                                for k in ("latent", "safetensors", "npy")) +
                        " t. ! queue ! latentfilesink name=forced format=npy location=%s" % p["forced"])
        STREAM.update(dir=d, paths=p, out=out)
    return STREAM


def case_bit_exact(c, model, tmp):
    s = main_stream(model, tmp)
    p = s["paths"]
    with open(p["f32"], "rb") as f:
        raw = f.read()
    shape = (7, Z, 6, 8)
    c.need(len(raw) == 4 * int(np.prod(shape)), "raw stream holds %d bytes, expected %s float32" % (len(raw), shape))
    for k in ("latent", "safetensors", "npy", "forced"):
        arr = read_latent_py(p[k], npy=(k == "forced"))
        c.check(arr.dtype == np.dtype("<f4") and arr.shape == shape,
                "%s: python reads %s %s, expected <f4 %s" % (k, arr.dtype, arr.shape, shape))
        c.check(arr.tobytes() == raw,
                "%s: python reading differs from the stream: %s" % (k, diff_text(arr.tobytes(), raw)))
        msgs = closed_messages(s["out"], k)
        c.check(msgs == [(p[k], 7, 0, NS30[7])],
                "%s: file-closed messages %s, expected [(%s, 7, 0, %d)]" % (k, msgs, p[k], NS30[7]))
    for k in ("latent", "safetensors", "npy"):
        got, text = read_latent_cpp(c, p[k], s["dir"])
        c.check(got == raw, "%s: C++ reading differs from the stream: %s" % (k, diff_text(got, raw)))
        c.check("shape 7x4x6x8 " in text, "%s: C++ reader prints %r" % (k, text[:200]))
        if k != "npy":
            c.check("comfyui-marker yes" in text, "%s: C++ reader sees no ComfyUI marker: %r" % (k, text))
    # .npy details: NumPy 1.0, C order, little-endian float32, data 64-byte aligned
    with open(p["npy"], "rb") as f:
        head = f.read(10)
        c.check(head[:8] == b"\x93NUMPY\x01\x00", ".npy magic/version %r" % head[:8])
        hlen = struct.unpack("<H", head[8:10])[0]
        c.check((10 + hlen) % 64 == 0, ".npy data starts at %d, not 64-byte aligned" % (10 + hlen))
    c.check(np.load(p["npy"]).flags["C_CONTIGUOUS"], ".npy is not C-ordered")
    return "7 latents of 4x6x8; .latent, .safetensors, .npy, format=npy equal the stream (Python and C++)"


def case_scaled_to_raw(c, model, tmp):
    """A .latent holds raw latents whatever the caps' latent-format (ComfyUI's
    LoadLatent scales them itself); .safetensors keeps the scaled values."""
    d = os.path.join(tmp, "scaled")
    os.mkdir(d)
    src = "videotestsrc num-buffers=6 ! %s ! vaeencode model=%s per-batch=3" % (src_caps(64, 48), model)
    launch_ok(c, "%s ! latentfilesink location=%s" % (src, os.path.join(d, "raw.latent")))
    launch_ok(c, "%s latent-format=sdxl ! latentfilesink location=%s" % (src, os.path.join(d, "sdxl.latent")))
    launch_ok(c, "%s latent-format=sd3 ! latentfilesink location=%s" % (src, os.path.join(d, "sd3.latent")))
    launch_ok(c, "%s latent-format=sdxl ! latentfilesink location=%s" % (src, os.path.join(d, "sdxl.safetensors")))
    raw = read_latent_py(os.path.join(d, "raw.latent"))
    for name in ("sdxl", "sd3"):
        _, meta, tensors, _, _ = read_safetensors(os.path.join(d, name + ".latent"))
        got = tensors["latent_tensor"]
        c.check(np.allclose(got, raw, rtol=1e-5, atol=1e-6),
                "%s.latent does not hold the raw latents: %s" % (name, diff_text(got, raw)))
        c.check(meta.get("latent_format") == "raw" and meta.get("converted_from_latent_format") == name,
                "%s.latent metadata: %s" % (name, {k: meta.get(k) for k in ("latent_format",
                                                                           "converted_from_latent_format")}))
    _, meta, tensors, _, _ = read_safetensors(os.path.join(d, "sdxl.safetensors"))
    c.check(np.allclose(tensors["latent_tensor"], raw * 0.13025, rtol=1e-5, atol=1e-7),
            "sdxl.safetensors is not the scaled stream: %s" % diff_text(tensors["latent_tensor"], raw * 0.13025))
    c.check(meta.get("latent_format") == "sdxl" and "converted_from_latent_format" not in meta,
            "sdxl.safetensors metadata: %s" % meta.get("latent_format"))
    return ".latent from sdxl and sd3 caps equals the raw stream; .safetensors keeps sdxl scaling"


def check_comfy_file(c, path, frames, expect_meta, raw=None):
    """ComfyUI's LoadLatent: safetensors.torch.load_file, then
    multiplier = 1.0 if 'latent_format_version_0' in latent else 1/0.18215; samples = latent_tensor * multiplier."""
    name = os.path.basename(path)
    header, meta, tensors, n, data_len = read_safetensors(path)
    with open(path, "rb") as f:
        blob = f.read()
    c.check(blob[8:9] == b"{", "%s: JSON header does not start with '{'" % name)
    c.check((8 + n) % 64 == 0, "%s: tensor data at %d, not 64-byte aligned" % (name, 8 + n))
    c.need(set(header) == {"latent_tensor", "latent_format_version_0"},
           "%s: tensors %s, expected exactly latent_tensor and latent_format_version_0" % (name, sorted(header)))
    marker, lt = header["latent_format_version_0"], header["latent_tensor"]
    c.check(marker["dtype"] == "F32" and marker["shape"] == [0]
            and marker["data_offsets"][0] == marker["data_offsets"][1],
            "%s: marker is %s, expected an empty F32 tensor of shape [0]" % (name, marker))
    c.check(lt["dtype"] == "F32" and len(lt["shape"]) == 4 and lt["shape"][0] == frames,
            "%s: latent_tensor %s %s, expected F32 of %d x C x h x w" % (name, lt["dtype"], lt["shape"], frames))
    # safetensors' validation: offsets contiguous from 0, sizes match the shapes, nothing after the last
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    pos = 0
    for a, b in spans:
        c.check(a == pos, "%s: data_offsets %s leave a gap or overlap at %d" % (name, spans, pos))
        pos = b
    c.check(pos == data_len, "%s: tensors end at %d, the data holds %d bytes" % (name, pos, data_len))
    c.check(lt["data_offsets"][1] - lt["data_offsets"][0] == 4 * int(np.prod(lt["shape"])),
            "%s: latent_tensor byte size does not match its shape" % name)
    c.check(all(isinstance(v, str) for v in meta.values()), "%s: non-string metadata values" % name)
    multiplier = 1.0 if "latent_format_version_0" in tensors else 1.0 / 0.18215
    c.check(multiplier == 1.0, "%s: ComfyUI would rescale by 1/0.18215" % name)
    if raw is not None:
        samples = tensors["latent_tensor"] * multiplier
        c.check(samples.tobytes() == raw, "%s: ComfyUI samples differ from the stream" % name)
    for k, v in expect_meta.items():
        c.check(meta.get(k) == v, "%s: metadata %s = %r, expected %r" % (name, k, meta.get(k), v))
    c.check(meta.get("created_by", "").startswith("gst-vae"), "%s: created_by = %r" % (name, meta.get("created_by")))
    return tensors["latent_tensor"], meta


def case_comfyui(c, model, tmp):
    s = main_stream(model, tmp)
    with open(s["paths"]["f32"], "rb") as f:
        raw = f.read()
    expect = {"frame_count": "7", "channels": "4", "height": "6", "width": "8", "framerate": "30/1",
              "first_pts_ns": "0", "end_pts_ns": str(NS30[7]), "latent_format": "raw", "segment": "0",
              "source_width": "64", "source_height": "48", "crop_x_y_w_h": "0,0,64,48", "model": MODEL_NAME}
    for k in ("latent", "safetensors"):
        _, meta = check_comfy_file(c, s["paths"][k], 7, expect, raw)
        # Image latents: exactly today's keys (no temporal_downscale), so the files stay byte-identical.
        c.check(set(meta) == set(expect) | {"created_by"},
                "%s: metadata keys %s, expected %s" % (k, sorted(meta), sorted(set(expect) | {"created_by"})))
    # A frame size that is no multiple of 8 is centre-cropped as ComfyUI does: x + (70 % 8) // 2.
    d = os.path.join(tmp, "b")
    os.mkdir(d)
    path, rawp = os.path.join(d, "crop.latent"), os.path.join(d, "crop.f32")
    launch_ok(c, encode(model, 3, 70, 50, 2, fps="25/1") + " ! tee name=t t. ! queue ! filesink location=%s "
              "t. ! queue ! latentfilesink location=%s" % (rawp, path))
    with open(rawp, "rb") as f:
        raw = f.read()
    check_comfy_file(c, path, 3, {"frame_count": "3", "height": "6", "width": "8", "framerate": "25/1",
                                  "end_pts_ns": "120000000", "source_width": "70", "source_height": "50",
                                  "crop_x_y_w_h": "3,1,64,48", "model": MODEL_NAME}, raw)
    return "marker + latent_tensor only, valid safetensors layout, metadata right (incl. crop 3,1,64,48 of 70x50)"


# ------------------------------------------------------------------ c

def check_segments(c, paths, sizes, raw, first=0):
    """Files hold `sizes` frames, segment numbers count up, PTS continuous, concatenation == raw."""
    chunks, k = [], first  # k: index of the file's first frame
    for path, n in zip(paths, sizes):
        c.need(os.path.exists(path), "%s missing" % path)
        arr, _ = check_comfy_file(c, path, n, {"frame_count": str(n), "first_pts_ns": str(NS30[k]),
                                               "end_pts_ns": str(NS30[k + n])})
        chunks.append(arr.tobytes())
        k += n
    joined = b"".join(chunks)
    c.check(joined == raw, "concatenated segments differ from the stream: %s" % diff_text(joined, raw))


def case_segments(c, model, tmp):
    d = os.path.join(tmp, "c")
    os.mkdir(d)
    rawp = os.path.join(d, "stream.f32")
    out = launch_ok(c, encode(model, 10, 64, 48, 3) + " ! tee name=t t. ! queue ! filesink location=%s" % rawp +
                    " t. ! queue ! latentfilesink name=frames max-frames=4 location=%s/seg-%%03d.latent" % d +
                    " t. ! queue ! latentfilesink name=npy max-frames=3 location=%s/n%%d.npy" % d)
    with open(rawp, "rb") as f:
        raw = f.read()
    names = sorted(os.listdir(d))
    expect = ["n0.npy", "n1.npy", "n2.npy", "n3.npy",
              "seg-000.latent", "seg-001.latent", "seg-002.latent", "stream.f32"]
    c.check(names == expect, "directory holds %s, expected %s" % (names, expect))
    segs = [os.path.join(d, "seg-%03d.latent" % i) for i in range(3)]
    check_segments(c, segs, [4, 4, 2], raw)
    for i, path in enumerate(segs):
        c.check(read_safetensors(path)[1].get("segment") == str(i), "%s: segment metadata is not %d" % (path, i))
    msgs = closed_messages(out, "frames")
    want = [(segs[0], 4, 0, NS30[4]), (segs[1], 4, NS30[4], NS30[8]), (segs[2], 2, NS30[8], NS30[10])]
    c.check(msgs == want, "file-closed messages %s, expected %s" % (msgs, want))
    npys = [np.load(os.path.join(d, "n%d.npy" % i)) for i in range(4)]
    c.check([a.shape[0] for a in npys] == [3, 3, 3, 1], ".npy segments of %s frames, expected 3,3,3,1"
            % [a.shape[0] for a in npys])
    c.check(b"".join(a.tobytes() for a in npys) == raw, "concatenated .npy segments differ from the stream")
    return "max-frames=4 over 10 -> seg-000..002 of 4,4,2 frames, PTS continuous; .npy pattern 3,3,3,1"


def case_duration(c, model, tmp):
    d = os.path.join(tmp, "c2")
    os.mkdir(d)
    rawp = os.path.join(d, "stream.f32")
    # 200 ms at 30 fps: frame 6 (PTS 200 ms) starts the second file, frame 12 the third; start-index=5
    out = launch_ok(c, encode(model, 14, 64, 48, 4) + " ! tee name=t t. ! queue ! filesink location=%s" % rawp +
                    " t. ! queue ! latentfilesink name=dur max-duration=200000000 start-index=5 "
                    "location=%s/dur-%%d.latent" % d)
    with open(rawp, "rb") as f:
        raw = f.read()
    names = sorted(os.listdir(d))
    c.check(names == ["dur-5.latent", "dur-6.latent", "dur-7.latent", "stream.f32"], "directory holds %s" % names)
    paths = [os.path.join(d, "dur-%d.latent" % i) for i in (5, 6, 7)]
    check_segments(c, paths, [6, 6, 2], raw)
    c.check(len(closed_messages(out, "dur")) == 3, "expected 3 file-closed messages")
    return "max-duration=200ms at 30 fps over 14 -> dur-5..7 of 6,6,2 frames"


# ------------------------------------------------------------------ d

LIVE = "videotestsrc is-live=true num-buffers=%d ! %s ! vaeencode model=%s per-batch=2 ! latentfilesink location=%s"


def start_live(model, location, log):
    return subprocess.Popen(["gst-launch-1.0"] + shlex.split(LIVE % (100000, src_caps(64, 48), model, location)),
                            stdout=log, stderr=subprocess.STDOUT)


def wait_temp_grown(c, proc, directory, name, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c.need(proc.poll() is None, "gst-launch-1.0 ended early (exit %s)" % proc.poll())
        for t in temp_files(directory, name):
            try:
                if os.path.getsize(t) > 4096:
                    return t
            except OSError:
                pass
        time.sleep(0.05)
    c.need(False, "no temporary file .%s.* grew beyond its 4096-byte header within %d s" % (name, timeout))


def case_kill(c, model, tmp):
    d = os.path.join(tmp, "d")
    os.mkdir(d)
    final = os.path.join(d, "live.latent")
    with open(os.path.join(tmp, "kill.log"), "wb") as log:
        proc = start_live(model, final, log)
        try:
            temp = wait_temp_grown(c, proc, d, "live.latent")
            c.check(not os.path.exists(final), "live.latent exists while the stream is still running")
        finally:
            proc.kill()
            proc.wait()
    c.check(not os.path.exists(final), "live.latent exists after SIGKILL: a half-written file under the final name")
    c.check(os.path.exists(temp), "the temporary file vanished (expected it to stay behind after SIGKILL)")
    # Recognisable, so that leftovers can be found and removed (docs/latent-files.md).
    c.check(re.fullmatch(r"\.live\.latent\.partial-[A-Za-z0-9]{6}", os.path.basename(temp)),
            "temporary file name %r is not .live.latent.partial-XXXXXX" % os.path.basename(temp))
    # A run that completes leaves exactly the final file.
    d2 = os.path.join(tmp, "d2")
    os.mkdir(d2)
    launch_ok(c, LIVE % (5, src_caps(64, 48), model, os.path.join(d2, "live.latent")))
    names = sorted(os.listdir(d2))
    c.check(names == ["live.latent"], "a completed run left %s, expected ['live.latent']" % names)
    if names == ["live.latent"]:
        check_comfy_file(c, os.path.join(d2, "live.latent"), 5, {"frame_count": "5"})
    return "SIGKILL after %d bytes: only %s; completed run: only live.latent" % (
        os.path.getsize(temp) if os.path.exists(temp) else -1, os.path.basename(temp))


def case_interrupt(c, model, tmp):
    """Ctrl-C without -e: the sink stops without EOS and finishes the file (whole frames only)."""
    d = os.path.join(tmp, "d3")
    os.mkdir(d)
    final = os.path.join(d, "live.latent")
    with open(os.path.join(tmp, "int.log"), "wb") as log:
        proc = start_live(model, final, log)
        try:
            wait_temp_grown(c, proc, d, "live.latent")
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(os.path.join(tmp, "int.log"), "rb") as f:
        log = f.read().decode("utf-8", "replace")
    c.need(os.listdir(d) == ["live.latent"], "after SIGINT the directory holds %s\n%s" % (os.listdir(d), log[-2000:]))
    _, meta, tensors, _, _ = read_safetensors(final)
    n = tensors["latent_tensor"].shape[0]
    c.check(n > 0 and meta.get("frame_count") == str(n), "%d frames, frame_count %r" % (n, meta.get("frame_count")))
    _, meta = check_comfy_file(c, final, n, {"frame_count": str(n)})
    c.check(meta.get("first_pts_ns", "").isdigit() and meta.get("end_pts_ns", "").isdigit(),
            "timestamps %r .. %r" % (meta.get("first_pts_ns"), meta.get("end_pts_ns")))
    return "SIGINT -> live.latent finished with %d frames" % n


# ------------------------------------------------------------------ e

def expect_error(c, description, needles, **kw):
    rc, out = launch(description, **kw)
    c.check(rc != 0, "gst-launch-1.0 exited 0, expected an error:\n%s" % excerpt(out))
    c.check("ERROR" in out, "no ERROR message printed:\n%s" % excerpt(out))
    for n in needles:
        c.check(n in out, "the error output does not mention %r:\n%s" % (n, excerpt(out)))
    return out


def case_bad_dirs(c, model, tmp):
    d = os.path.join(tmp, "e1")
    os.mkdir(d)
    missing = os.path.join(d, "missing", "sub", "out.latent")
    expect_error(c, encode(model, 2, 64, 48, 2) + " ! latentfilesink location=%s" % missing, [missing])
    plain = os.path.join(d, "plain.txt")
    with open(plain, "w") as f:
        f.write("not a directory\n")
    below = os.path.join(plain, "out.latent")
    expect_error(c, encode(model, 2, 64, 48, 2) + " ! latentfilesink location=%s" % below, [below])
    c.check(sorted(os.listdir(d)) == ["plain.txt"], "left behind: %s" % os.listdir(d))
    return "missing directory and file-as-directory: error naming the path"


def limit_file_size():
    # SIGXFSZ keeps its default action (terminate): the sink must stop short of
    # the limit itself. (Python ignores SIGXFSZ; subprocess restores the default
    # in the child, and this makes it explicit.)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (70000, 70000))


def case_disk_full(c, model, tmp):
    d = os.path.join(tmp, "e2")
    os.mkdir(d)
    final = os.path.join(d, "full.latent")
    # 4096-byte header + 120 x 768 bytes > 70000
    rc, out = launch(encode(model, 120, 64, 48, 8) + " ! latentfilesink location=%s" % final,
                     preexec_fn=limit_file_size)
    c.check(rc > 0, "gst-launch-1.0 %s, expected a clean error exit:\n%s"
            % ("was killed by signal %d" % -rc if rc < 0 else "exited 0", excerpt(out)))
    for needle in ("ERROR", "Could not write latent file '%s'" % final, "file size limit", "RLIMIT_FSIZE",
                   "70000 bytes"):
        c.check(needle in out, "the output does not mention %r:\n%s" % (needle, excerpt(out)))
    c.check(not os.path.exists(final), "full.latent exists after a write failure")
    c.check(not temp_files(d, "full.latent"), "temporary file left: %s" % temp_files(d, "full.latent"))
    return "RLIMIT_FSIZE 70000, SIGXFSZ not ignored: error exit %d, no signal, nothing left" % rc


def appsrc_child(model, location, out_json, sizes="64x48,40x32"):
    """Runs in a child process: appsrc, 2 frames of each size (default 64x48 then 40x32) -> vaeencode ->
    latentfilesink."""
    import gi
    gi.require_version("Gst", "1.0")
    from gi.repository import Gst
    Gst.init(None)
    pipeline = Gst.parse_launch('appsrc name=src format=time ! vaeencode model="%s" per-batch=2 ! '
                                'latentfilesink name=sink location="%s"' % (model, location))
    src, sink = pipeline.get_by_name("src"), pipeline.get_by_name("sink")
    pipeline.set_state(Gst.State.PLAYING)
    rng = np.random.default_rng(5)
    i = 0
    for w, h in (tuple(int(v) for v in size.split("x")) for size in sizes.split(",")):
        src.set_property("caps", Gst.Caps.from_string(src_caps(w, h)))
        for _ in range(2):
            stride = (w * 3 + 3) // 4 * 4  # GStreamer's default RGB stride: rows padded to 4 bytes
            buf = Gst.Buffer.new_wrapped(rng.integers(0, 256, h * stride, dtype=np.uint8).tobytes())
            buf.pts, buf.duration = NS30[i], NS30[i + 1] - NS30[i]
            src.emit("push-buffer", buf)
            i += 1
    src.emit("end-of-stream")
    result = bus_until_end(Gst, pipeline)  # eos, error, warnings, file-closed messages
    result.update(frames_written=sink.get_property("frames-written"), files_written=sink.get_property("files-written"))
    pipeline.set_state(Gst.State.NULL)
    with open(out_json, "w") as f:
        json.dump(result, f)


def run_appsrc(c, model, location, tmp, sizes="64x48,40x32"):
    out_json = os.path.join(tmp, "appsrc-%d.json" % int(time.monotonic() * 1000))
    p = subprocess.run([PYTHON, os.path.abspath(__file__), "--appsrc-child", model, location, out_json, sizes],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    text = p.stdout.decode("utf-8", "replace")
    c.need(p.returncode == 0 and os.path.exists(out_json), "appsrc child exited %d:\n%s" % (p.returncode, text[-3000:]))
    with open(out_json) as f:
        return json.load(f)


def case_caps_change_error(c, model, tmp):
    d = os.path.join(tmp, "e3")
    os.mkdir(d)
    final = os.path.join(d, "change.latent")
    r = run_appsrc(c, model, final, tmp)
    c.check(not r["eos"] and r["error"], "no error on a size change without a pattern: %s" % r)
    c.check(r["error"] and "size changed" in r["error"] and r["error"].startswith("sink |"),
            "the error does not come from latentfilesink or does not mention the size change: %s" % r["error"])
    c.check(not temp_files(d, "change.latent"), "temporary file left: %s" % temp_files(d, "change.latent"))
    note = "ERROR: %s" % (r["error"] or "").split(" | ")[1:2]
    if os.path.exists(final):  # the frames before the change are whole: a finished file is acceptable
        arr, _ = check_comfy_file(c, final, 2, {"frame_count": "2", "source_width": "64"})
        c.check(arr.shape == (2, Z, 6, 8), "change.latent holds %s, expected the 2 first-size latents" % (arr.shape,))
        note += "; the 2 latents before the change were kept in change.latent"
    return note


def case_caps_change_pattern(c, model, tmp):
    d = os.path.join(tmp, "e4")
    os.mkdir(d)
    r = run_appsrc(c, model, os.path.join(d, "cc-%02d.latent"), tmp)
    c.need(r["eos"] and not r["error"], "size change with a pattern did not end in EOS: %s" % r)
    c.check(r["files_written"] == 2 and r["frames_written"] == 4, "files-written %s, frames-written %s, expected 2, 4"
            % (r["files_written"], r["frames_written"]))
    names = sorted(os.listdir(d))
    c.need(names == ["cc-00.latent", "cc-01.latent"], "directory holds %s" % names)
    a, _ = check_comfy_file(c, os.path.join(d, "cc-00.latent"), 2,
                            {"segment": "0", "width": "8", "height": "6", "source_width": "64", "source_height": "48",
                             "first_pts_ns": "0", "end_pts_ns": str(NS30[2])})
    b, _ = check_comfy_file(c, os.path.join(d, "cc-01.latent"), 2,
                            {"segment": "1", "width": "5", "height": "4", "source_width": "40", "source_height": "32",
                             "crop_x_y_w_h": "0,0,40,32", "first_pts_ns": str(NS30[2]), "end_pts_ns": str(NS30[4])})
    c.check(a.shape == (2, Z, 6, 8) and b.shape == (2, Z, 4, 5), "shapes %s, %s" % (a.shape, b.shape))
    return "cc-00.latent 2x4x6x8, cc-01.latent 2x4x4x5"


# ------------------------------------------------------------------ f

def case_python_example(c, model, tmp):
    out_path = os.path.join(tmp, "example.latent")
    p = subprocess.run([PYTHON, EXAMPLE_PY, "--model", model, "--frames", "6", "--width", "64", "--height", "48",
                        "--per-batch", "4", "--out", out_path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=300)
    text = p.stdout.decode("utf-8", "replace")
    c.need(p.returncode == 0, "capture_latents.py exited %d:\n%s" % (p.returncode, text[-3000:]))
    c.check("(6, 4, 6, 8)" in text, "capture_latents.py did not print the shape (6, 4, 6, 8):\n%s" % text)
    c.check(os.path.exists(out_path), "capture_latents.py wrote no %s" % out_path)
    return text.strip().splitlines()[0]


def case_c_example(c, model, tmp):
    exe = os.environ["GSTVAE_PROGRESS_EXAMPLE"]
    p = subprocess.run([exe, model, "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    text = p.stdout.decode("utf-8", "replace")
    c.need(p.returncode == 0, "progress exited %d:\n%s%s" % (p.returncode, text, p.stderr.decode("utf-8", "replace")))
    lines = [l for l in text.splitlines() if re.match(r"progress: \d+ frames, [0-9.]+ frames/s", l)]
    c.check(len(lines) >= 1, "no progress line printed:\n%s" % text)
    c.check(lines and lines[-1].startswith("progress: 10 frames"),
            "the last progress line is not at 10 frames: %s" % lines)
    bad = os.path.join(tmp, "no-such-model.safetensors")
    p = subprocess.run([exe, bad], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    err = p.stderr.decode("utf-8", "replace")
    c.check(p.returncode != 0 and bad in err, "with a missing model: exit %d, stderr %r" % (p.returncode, err))
    return "%d progress lines; missing model -> exit %d" % (len(lines), p.returncode)


# ------------------------------------------------------------------ g

def gst_init():
    import gi
    gi.require_version("Gst", "1.0")
    from gi.repository import Gst
    Gst.init(None)
    return Gst


def bus_until_end(Gst, pipeline, timeout_s=120):
    """The bus messages up to EOS or an error: eos, error, warnings, file-closed messages."""
    bus = pipeline.get_bus()
    r = {"eos": False, "error": None, "warnings": [], "closed": []}
    types = Gst.MessageType.EOS | Gst.MessageType.ERROR | Gst.MessageType.WARNING | Gst.MessageType.ELEMENT
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        msg = bus.timed_pop_filtered(int(left * Gst.SECOND), types) if left > 0 else None
        if msg is None:
            r["error"] = "timeout"
            break
        if msg.type == Gst.MessageType.EOS:
            r["eos"] = True
            break
        if msg.type == Gst.MessageType.ERROR:
            err, debug = msg.parse_error()
            r["error"] = "%s | %s | %s" % (msg.src.get_name(), err.message, debug)
            break
        if msg.type == Gst.MessageType.WARNING:
            err, debug = msg.parse_warning()
            r["warnings"].append("%s | %s | %s" % (msg.src.get_name(), err.message, debug))
        elif msg.get_structure() is not None and msg.get_structure().get_name() == "latentfilesink-file-closed":
            st = msg.get_structure()
            r["closed"].append([st.get_string("location"), st.get_value("frames"), st.get_value("first-pts"),
                                st.get_value("end-pts")])
    return r


def child_playing_limits(model, location, props):
    """videotestsrc 40 frames -> latentfilesink; `props` are set in PLAYING while the 6th latent is held."""
    Gst = gst_init()
    pipeline = Gst.parse_launch('videotestsrc num-buffers=40 ! %s ! vaeencode model="%s" per-batch=4 ! '
                                'latentfilesink name=sink location="%s"' % (src_caps(64, 48), model, location))
    sink = pipeline.get_by_name("sink")
    held, go, count = threading.Event(), threading.Event(), [0]

    def probe(pad, info):
        count[0] += 1
        if count[0] == 6:  # 5 latents rendered, so the sink is PLAYING: hold the 6th until the change is made
            held.set()
            go.wait(60)
        return Gst.PadProbeReturn.OK

    sink.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, probe)
    pipeline.set_state(Gst.State.PLAYING)
    r = {"held": held.wait(60)}
    r["sink_state"] = sink.get_state(0)[1].value_nick
    for k, v in props.items():
        sink.set_property(k, v)
    r["props_after"] = {k: sink.get_property(k) for k in props}
    go.set()
    r.update(bus_until_end(Gst, pipeline))
    r["frames_written"] = sink.get_property("frames-written")
    pipeline.set_state(Gst.State.NULL)
    return r


def case_playing_limits_plain(c, model, tmp):
    d = os.path.join(tmp, "g1")
    os.mkdir(d)
    plain = os.path.join(d, "plain.latent")
    r = run_child(c, tmp, "playing_limits", model, plain, {"max-frames": 10, "max-duration": 100000000})
    c.need(r["held"] and r["sink_state"] == "playing", "the change was not made in PLAYING: %s" % r)
    c.check(r["eos"] and not r["error"], "did not end in EOS: %s" % r["error"])
    c.check(r["props_after"] == {"max-frames": 0, "max-duration": 0},
            "max-frames/max-duration accepted on a plain location in PLAYING: %s" % r["props_after"])
    for prop in ("max-frames", "max-duration"):
        c.check(any(w.startswith("sink |") and prop in w and "pattern" in w for w in r["warnings"]),
                "no warning from the sink about refusing %s: %s" % (prop, r["warnings"]))
    c.check(r["closed"] == [[plain, 40, 0, NS30[40]]], "file-closed messages %s, expected one of 40 latents"
            % r["closed"])
    c.check(sorted(os.listdir(d)) == ["plain.latent"], "directory holds %s" % os.listdir(d))
    if os.path.exists(plain):
        check_comfy_file(c, plain, 40, {"frame_count": "40", "first_pts_ns": "0", "end_pts_ns": str(NS30[40])})
    # With a pattern the change is applied in PLAYING, as documented.
    d2 = os.path.join(tmp, "g1p")
    os.mkdir(d2)
    r = run_child(c, tmp, "playing_limits", model, os.path.join(d2, "p-%d.latent"), {"max-frames": 10})
    c.check(r["eos"] and not r["error"] and not r["warnings"], "pattern: %s" % r)
    c.check(r["props_after"] == {"max-frames": 10}, "pattern: max-frames not applied: %s" % r["props_after"])
    c.check([m[1] for m in r["closed"]] == [10, 10, 10, 10], "pattern: files of %s latents, expected 4 x 10"
            % [m[1] for m in r["closed"]])
    return "plain: both refused with warnings, 1 file of 40; pattern: max-frames=10 applied -> 4 files"


def case_location_directory(c, model, tmp):
    d = os.path.join(tmp, "g4")
    os.mkdir(d)
    # A plain location that is a directory: refused at start, before anything is encoded.
    target = os.path.join(d, "out.latent")
    os.mkdir(target)
    out = expect_error(c, encode(model, 4, 64, 48, 2) + " ! latentfilesink location=%s" % target,
                       ["Could not open latent file '%s' for writing" % target, "is a directory"])
    c.check("Failed to set pipeline to PAUSED" in out, "the error did not come at start:\n%s" % excerpt(out))
    # The first name of a pattern: also at start.
    os.mkdir(os.path.join(d, "seg-0.latent"))
    out = expect_error(c, encode(model, 4, 64, 48, 2) + " ! latentfilesink location=%s/seg-%%d.latent" % d,
                       ["Could not open latent file '%s/seg-0.latent' for writing" % d, "is a directory"])
    c.check("Failed to set pipeline to PAUSED" in out, "pattern: the error did not come at start:\n%s" % excerpt(out))
    # A later segment: when that segment is opened; the segments before it are kept.
    os.mkdir(os.path.join(d, "s-1.latent"))
    out = expect_error(c, encode(model, 6, 64, 48, 2) +
                       " ! latentfilesink max-frames=2 location=%s/s-%%d.latent" % d,
                       ["Could not open latent file '%s/s-1.latent' for writing" % d, "is a directory"])
    names = sorted(os.listdir(d))
    c.check(names == ["out.latent", "s-0.latent", "s-1.latent", "seg-0.latent"], "directory holds %s" % names)
    for sub in ("out.latent", "seg-0.latent", "s-1.latent"):
        c.check(os.path.isdir(os.path.join(d, sub)) and not os.listdir(os.path.join(d, sub)),
                "%s is no longer an empty directory" % sub)
    if os.path.isfile(os.path.join(d, "s-0.latent")):
        check_comfy_file(c, os.path.join(d, "s-0.latent"), 2, {"frame_count": "2"})
    return "plain and first pattern name: error at start; s-1.latent a directory: error at that segment"


def case_extension_case(c, model, tmp):
    d = os.path.join(tmp, "g8")
    os.mkdir(d)
    rawp, npy, st = os.path.join(d, "s.f32"), os.path.join(d, "y.NPY"), os.path.join(d, "z.SafeTensors")
    launch_ok(c, encode(model, 2, 64, 48, 2) + " ! tee name=t t. ! queue ! filesink location=%s" % rawp +
              " t. ! queue ! latentfilesink location=%s t. ! queue ! latentfilesink location=%s" % (npy, st))
    with open(rawp, "rb") as f:
        raw = f.read()
    with open(npy, "rb") as f:
        c.need(f.read(6) == b"\x93NUMPY", "y.NPY does not hold a NumPy file")
    c.check(np.load(npy).tobytes() == raw, "y.NPY differs from the stream")
    check_comfy_file(c, st, 2, {"frame_count": "2"}, raw)
    got, text = read_latent_cpp(c, npy, d)
    c.check(got == raw and "shape 2x4x6x8 " in text, "C++ reader on y.NPY: %r" % text[:200])
    return "y.NPY -> .npy (read back by Python and C++), z.SafeTensors -> safetensors"


def case_umask(c, model, tmp):
    modes = {}
    for umask, want in ((0o027, 0o640), (0o022, 0o644)):
        d = os.path.join(tmp, "g9-%03o" % umask)
        os.mkdir(d)
        path = os.path.join(d, "m.latent")
        launch_ok(c, encode(model, 2, 64, 48, 2) + " ! latentfilesink location=%s" % path,
                  preexec_fn=lambda u=umask: os.umask(u))
        modes[umask] = os.stat(path).st_mode & 0o777
        c.check(modes[umask] == want, "umask %03o: file mode %03o, expected %03o" % (umask, modes[umask], want))
    return "umask 027 -> %03o, 022 -> %03o" % (modes[0o027], modes[0o022])


def case_source_size_change(c, model, tmp):
    """64x64 then 70x66: the same 8x8 latent size, another source size and crop."""
    d = os.path.join(tmp, "g7")
    os.mkdir(d)
    r = run_appsrc(c, model, os.path.join(d, "sz-%02d.latent"), tmp, sizes="64x64,70x66")
    c.need(r["eos"] and not r["error"], "pattern: no EOS: %s" % r)
    names = sorted(os.listdir(d))
    c.need(names == ["sz-00.latent", "sz-01.latent"], "pattern: directory holds %s, expected 2 segments" % names)
    check_comfy_file(c, os.path.join(d, "sz-00.latent"), 2,
                     {"segment": "0", "source_width": "64", "source_height": "64", "crop_x_y_w_h": "0,0,64,64",
                      "first_pts_ns": "0", "end_pts_ns": str(NS30[2])})
    check_comfy_file(c, os.path.join(d, "sz-01.latent"), 2,
                     {"segment": "1", "source_width": "70", "source_height": "66", "crop_x_y_w_h": "3,1,64,64",
                      "first_pts_ns": str(NS30[2]), "end_pts_ns": str(NS30[4])})
    # A plain location: one file, the sizes recorded per range; no top-level key false for any frame.
    d2 = os.path.join(tmp, "g7p")
    os.mkdir(d2)
    plain = os.path.join(d2, "sz.latent")
    r = run_appsrc(c, model, plain, tmp, sizes="64x64,70x66")
    c.need(r["eos"] and not r["error"], "plain: no EOS: %s" % r)
    _, meta = check_comfy_file(c, plain, 4, {"frame_count": "4", "first_pts_ns": "0", "end_pts_ns": str(NS30[4])})
    for k in ("source_width", "source_height", "crop_x_y_w_h"):
        c.check(k not in meta, "plain: top-level %s = %r describes only some frames" % (k, meta.get(k)))
    c.need("ranges" in meta, "plain: no 'ranges' metadata: %s" % meta)
    ranges = json.loads(meta["ranges"])
    want = [{"first_frame": 0, "frames": 2, "source_width": 64, "source_height": 64, "crop_x_y_w_h": "0,0,64,64",
             "first_pts_ns": 0, "end_pts_ns": NS30[2]},
            {"first_frame": 2, "frames": 2, "source_width": 70, "source_height": 66, "crop_x_y_w_h": "3,1,64,64",
             "first_pts_ns": NS30[2], "end_pts_ns": NS30[4], "after": "caps"}]
    c.check(len(ranges) == 2 and all(all(rg.get(k) == v for k, v in w.items()) for rg, w in zip(ranges, want)),
            "plain: ranges %s, expected %s" % (ranges, want))
    image_range_keys = {"first_frame", "frames", "first_pts_ns", "end_pts_ns", "source_width", "source_height",
                        "crop_x_y_w_h", "framerate", "latent_format", "after"}
    c.check(all(set(rg) == image_range_keys for rg in ranges) and "temporal_downscale" not in meta,
            "plain: image ranges hold other keys than %s: %s" % (sorted(image_range_keys), ranges))
    # 20 ranges do not fit the 4096-byte header: the first ones that do are kept, the last entry says from
    # which frame on the rest are not recorded, and the element warns.
    d3 = os.path.join(tmp, "g7m")
    os.mkdir(d3)
    many = os.path.join(d3, "many.latent")
    r = run_appsrc(c, model, many, tmp, sizes=",".join(["64x64", "70x66"] * 10))
    c.need(r["eos"] and not r["error"], "many: no EOS: %s" % r)
    _, meta3 = check_comfy_file(c, many, 40, {"frame_count": "40"})
    many_ranges = json.loads(meta3.get("ranges", "[]"))
    kept = len(many_ranges) - 1
    c.check(kept >= 2 and many_ranges[-1] == {"first_frame": 2 * kept, "unrecorded_ranges": 20 - kept}
            and all(rg["first_frame"] == 2 * i and rg["source_width"] == (64, 70)[i % 2]
                    for i, rg in enumerate(many_ranges[:-1])),
            "many: ranges %s" % many_ranges)
    c.check(any(w.startswith("sink |") and "records only %d of its 20 ranges" % kept in w for w in r["warnings"]),
            "many: no warning about unrecorded ranges: %s" % r["warnings"])
    return "pattern: sz-00 64x64, sz-01 70x66 crop 3,1,64,64; plain: ranges %s; 20 ranges: %d recorded + marker" % (
        meta["ranges"], kept)


def child_flush_seek(model, location):
    """videotestsrc -> latentfilesink; after 10 latents a flushing seek to 2.0-2.5 s (15 frames)."""
    Gst = gst_init()
    pipeline = Gst.parse_launch('videotestsrc num-buffers=40 ! %s ! vaeencode model="%s" per-batch=2 ! '
                                'latentfilesink name=sink location="%s"' % (src_caps(64, 48), model, location))
    sink = pipeline.get_by_name("sink")
    reached, flush_started = threading.Event(), threading.Event()
    st = {"before": 0, "after_flush": False}

    def probe(pad, info):
        # Exactly 10 latents before the flush: the 11th is held until FLUSH_START, then dropped
        # with any other latent from before the seek.
        if info.type & Gst.PadProbeType.BUFFER:
            if st["after_flush"]:
                return Gst.PadProbeReturn.OK
            if st["before"] < 10:
                st["before"] += 1
                return Gst.PadProbeReturn.OK
            reached.set()
            flush_started.wait(60)
            return Gst.PadProbeReturn.DROP
        ev = info.get_event()
        if ev.type == Gst.EventType.FLUSH_START:
            flush_started.set()
        elif ev.type == Gst.EventType.FLUSH_STOP:
            st["after_flush"] = True
        return Gst.PadProbeReturn.OK

    sink.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER | Gst.PadProbeType.EVENT_FLUSH, probe)
    pipeline.set_state(Gst.State.PLAYING)
    r = {"reached": reached.wait(60)}
    r["seek"] = pipeline.seek(1.0, Gst.Format.TIME, Gst.SeekFlags.FLUSH | Gst.SeekFlags.ACCURATE,
                              Gst.SeekType.SET, 2 * Gst.SECOND, Gst.SeekType.SET, 2500 * Gst.MSECOND)
    r.update(bus_until_end(Gst, pipeline))
    r["frames_written"] = sink.get_property("frames-written")
    pipeline.set_state(Gst.State.NULL)
    return r


def case_flush_seek(c, model, tmp):
    after = [i * 1000000000 // 30 for i in range(60, 76)]  # frames 60..74 of the seek, and the end of 74
    d = os.path.join(tmp, "g11")
    os.mkdir(d)
    r = run_child(c, tmp, "flush_seek", model, os.path.join(d, "f-%d.latent"))
    c.need(r["reached"] and r["seek"] and r["eos"] and not r["error"], "pattern: %s" % r)
    c.check(r["frames_written"] == 25, "pattern: %d latents written, expected 10 + 15" % r["frames_written"])
    names = sorted(os.listdir(d))
    c.need(names == ["f-0.latent", "f-1.latent"], "pattern: directory holds %s, expected a new file after the "
           "flush" % names)
    check_comfy_file(c, os.path.join(d, "f-0.latent"), 10,
                     {"frame_count": "10", "first_pts_ns": "0", "end_pts_ns": str(NS30[10])})
    check_comfy_file(c, os.path.join(d, "f-1.latent"), 15,
                     {"frame_count": "15", "first_pts_ns": str(after[0]), "end_pts_ns": str(after[15])})
    # A plain location: one file, the flush starts a new range in the metadata.
    d2 = os.path.join(tmp, "g11p")
    os.mkdir(d2)
    plain = os.path.join(d2, "f.latent")
    r = run_child(c, tmp, "flush_seek", model, plain)
    c.need(r["reached"] and r["seek"] and r["eos"] and not r["error"], "plain: %s" % r)
    _, meta = check_comfy_file(c, plain, 25, {"frame_count": "25", "first_pts_ns": "0",
                                              "end_pts_ns": str(after[15]), "source_width": "64"})
    c.need("ranges" in meta, "plain: no 'ranges' metadata marks the flush: %s" % meta)
    ranges = json.loads(meta["ranges"])
    want = [{"first_frame": 0, "frames": 10, "first_pts_ns": 0, "end_pts_ns": NS30[10]},
            {"first_frame": 10, "frames": 15, "first_pts_ns": after[0], "end_pts_ns": after[15], "after": "flush"}]
    c.check(len(ranges) == 2 and all(all(rg.get(k) == v for k, v in w.items()) for rg, w in zip(ranges, want)),
            "plain: ranges %s, expected %s" % (ranges, want))
    return "pattern: f-0 (10, 0 s..), f-1 (15, 2 s..); plain: ranges %s" % meta["ranges"]


def case_leftover_temp(c, model, tmp):
    d = os.path.join(tmp, "gt")
    os.mkdir(d)
    left = [os.path.join(d, n) for n in (".left.latent.partial-AbC123", ".other.latent.partial-xyz789",
                                         ".seg-007.latent.partial-Q1w2E3", ".seg-12.latent.partial-000000",
                                         ".seg-x.latent.partial-Q1w2E3", ".seg-007.latent.partial-toolong7")]
    for p in left:
        with open(p, "wb") as f:
            f.write(b"x" * 5000)
    out = launch_ok(c, encode(model, 2, 64, 48, 2) + " ! latentfilesink name=plain location=%s/left.latent" % d)
    c.check(re.search(r"WARNING: from element \S+plain: .*\b1 leftover temporary file\b", out),
            "plain: no warning about 1 leftover temporary file:\n%s" % excerpt(out))
    c.check(left[0] in out, "plain: the warning does not name %s:\n%s" % (left[0], excerpt(out)))
    out = launch_ok(c, encode(model, 2, 64, 48, 2) + " ! latentfilesink name=pat location=%s/seg-%%03d.latent" % d)
    c.check(re.search(r"WARNING: from element \S+pat: .*\b2 leftover temporary files\b", out),
            "pattern: no warning about 2 leftover temporary files:\n%s" % excerpt(out))
    c.check(left[2] in out or left[3] in out, "pattern: the warning names neither leftover:\n%s" % excerpt(out))
    c.check(all(os.path.exists(p) for p in left), "a leftover temporary file was deleted")
    out = launch_ok(c, encode(model, 2, 64, 48, 2) + " ! latentfilesink name=clean location=%s/new.latent" % d)
    c.check("leftover" not in out, "a warning without leftovers:\n%s" % excerpt(out))
    c.check(os.path.exists(os.path.join(d, "left.latent")) and os.path.exists(os.path.join(d, "seg-000.latent")),
            "files not written: %s" % sorted(os.listdir(d)))
    return "warned (1 for left.latent, 2 for seg-%03d.latent), nothing deleted"


def case_python_example_zero(c, model, tmp):
    out_path = os.path.join(tmp, "zero.latent")
    p = subprocess.run([PYTHON, EXAMPLE_PY, "--model", model, "--frames", "0", "--out", out_path],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    text = p.stdout.decode("utf-8", "replace")
    c.check(p.returncode == 0, "capture_latents.py --frames 0 exited %d:\n%s" % (p.returncode, text[-3000:]))
    c.check("Traceback" not in text, "capture_latents.py --frames 0 crashed:\n%s" % text[-3000:])
    c.check("no latents" in text, "capture_latents.py --frames 0 does not say 'no latents':\n%s" % text)
    c.check(not os.path.exists(out_path), "capture_latents.py --frames 0 wrote %s" % out_path)
    return text.strip().splitlines()[-1] if text.strip() else "(no output)"


# ------------------------------------------------------------------ h. video latents

WAN = {}


def wan_model(c, tmp):
    """A random Wan 2.1 checkpoint (dim 8, z 16, encoder and decoder), written once."""
    if "path" not in WAN:
        path = os.path.join(tmp, "wan21-test.safetensors")
        p = subprocess.run([PYTHON, os.path.join(HERE, "wan_weights.py"), "--variant", "2.1", "--dim", "8",
                            "--with-decoder", "--out", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=300)
        c.need(p.returncode == 0, "wan_weights.py exited %d:\n%s" % (p.returncode, p.stdout.decode()[-2000:]))
        WAN["path"] = path
    return WAN["path"]


def case_wan_metadata(c, model, tmp):
    """vaeencode with a Wan model: 9 frames at 24/1 -> 3 latents at 6/1, temporal-downscale=4, recorded."""
    wan = wan_model(c, tmp)
    d = os.path.join(tmp, "h1")
    os.mkdir(d)
    rawp, lat, st, npy = (os.path.join(d, n) for n in ("w.f32", "w.latent", "w.safetensors", "w.npy"))
    launch_ok(c, "videotestsrc num-buffers=9 ! %s ! vaeencode model=%s ! tee name=t t. ! queue ! filesink location=%s "
              "t. ! queue ! latentfilesink location=%s t. ! queue ! latentfilesink location=%s "
              "t. ! queue ! latentfilesink location=%s" % (src_caps(64, 48, "24/1"), wan, rawp, lat, st, npy))
    with open(rawp, "rb") as f:
        raw = f.read()
    c.need(len(raw) == 3 * 16 * 6 * 8 * 4, "vaeencode gave %d bytes, expected 3 latents of 16x6x8" % len(raw))
    for path in (lat, st):
        _, meta = check_comfy_file(c, path, 3, {"frame_count": "3", "channels": "16", "framerate": "6/1",
                                                "temporal_downscale": "4", "first_pts_ns": "0",
                                                "end_pts_ns": str(9 * 1000000000 // 24), "source_width": "64",
                                                "source_height": "48"}, raw)
        c.check("ranges" not in meta, "%s: ranges %s for one range" % (path, meta.get("ranges")))
    c.check(np.load(npy).tobytes() == raw, "w.npy differs from the stream")
    return "3 latents of 16x6x8 at 6/1, temporal_downscale=4 in .latent and .safetensors"


def case_ltx2_normalised(c, model, tmp):
    """vaeencode with an LTX-2 model (normalised ltx2 latents by default): a .safetensors keeps them and records
    latent_format=ltx2 and temporal_downscale=8; a .latent or .npy, which hold raw latents, is refused with the
    reason (the statistics are in the VAE checkpoint, which the sink never sees)."""
    ltx = os.path.join(tmp, "ltx2-test.safetensors")
    p = subprocess.run([PYTHON, os.path.join(HERE, "ltx2_reference.py"), "--write", ltx, "--width", "8"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    c.need(p.returncode == 0, "ltx2_reference.py exited %d:\n%s" % (p.returncode, p.stdout.decode()[-2000:]))
    d = os.path.join(tmp, "ltx2")
    os.mkdir(d)
    src = "videotestsrc num-buffers=9 ! %s ! vaeencode model=%s" % (src_caps(64, 64, "24/1"), ltx)
    st = os.path.join(d, "l.safetensors")
    launch_ok(c, "%s ! latentfilesink location=%s" % (src, st))
    _, meta, tensors, _, _ = read_safetensors(st)
    c.check(tensors["latent_tensor"].shape == (2, 8, 2, 2), "shape %s" % (tensors["latent_tensor"].shape,))
    c.check(meta.get("latent_format") == "ltx2" and meta.get("temporal_downscale") == "8",
            "metadata %s" % {k: meta.get(k) for k in ("latent_format", "temporal_downscale")})
    for name in ("l.latent", "l.npy"):
        rc, out = launch("%s ! latentfilesink location=%s" % (src, os.path.join(d, name)))
        c.check(rc != 0 and "Cannot store latent-format 'ltx2'" in out and "latent-format=raw" in out,
                "%s: exit %d, no refusal naming ltx2:\n%s" % (name, rc, excerpt(out, 1500)))
        c.check(not os.path.exists(os.path.join(d, name)), "%s was written" % name)
    return "ltx2 latents kept in .safetensors (latent_format=ltx2), refused for .latent and .npy"


def child_latent_caps(location, caps_list, per_caps):
    """appsrc -> latentfilesink: `per_caps` latents of 4x6x8 under each caps string of `caps_list`."""
    Gst = gst_init()
    pipeline = Gst.parse_launch('appsrc name=src format=time ! latentfilesink name=sink location="%s"' % location)
    src = pipeline.get_by_name("src")
    pipeline.set_state(Gst.State.PLAYING)
    i = 0
    for caps in caps_list:
        src.set_property("caps", Gst.Caps.from_string(caps))
        for _ in range(per_caps):
            buf = Gst.Buffer.new_wrapped(np.full(Z * 6 * 8, i, np.float32).tobytes())
            buf.pts, buf.duration = i * 250000000, 250000000
            src.emit("push-buffer", buf)
            i += 1
    src.emit("end-of-stream")
    r = bus_until_end(Gst, pipeline)
    pipeline.set_state(Gst.State.NULL)
    return r


def case_temporal_ranges(c, model, tmp):
    """A change of temporal-downscale (same latent size) is a caps change: a new range or a new segment."""
    base = ("application/x-latent,format=F32,channels=%d,width=8,height=6,source-width=64,source-height=48,"
            "framerate=4/1,latent-format=raw" % Z)
    caps = [base, base + ",temporal-downscale=4", base + ",temporal-downscale=4", base]
    d = os.path.join(tmp, "h2")
    os.mkdir(d)
    plain = os.path.join(d, "mixed.latent")
    r = run_child(c, tmp, "latent_caps", plain, caps, 2)
    c.need(r["eos"] and not r["error"], "plain: %s" % r)
    _, meta = check_comfy_file(c, plain, 8, {"frame_count": "8", "framerate": "4/1", "source_width": "64"})
    c.check("temporal_downscale" not in meta, "plain: top-level temporal_downscale %r holds for some frames only"
            % meta.get("temporal_downscale"))
    ranges = json.loads(meta.get("ranges", "[]"))
    got = [(rg.get("first_frame"), rg.get("frames"), rg.get("temporal_downscale"), rg.get("after")) for rg in ranges]
    want = [(0, 2, None, "start"), (2, 4, 4, "caps"), (6, 2, None, "caps")]
    c.check(got == want, "plain: ranges (first_frame, frames, temporal_downscale, after) %s, expected %s"
            % (got, want))
    r = run_child(c, tmp, "latent_caps", os.path.join(d, "seg-%d.latent"), caps, 2)
    c.need(r["eos"] and not r["error"], "pattern: %s" % r)
    names = sorted(os.listdir(d))
    c.need(names == ["mixed.latent", "seg-0.latent", "seg-1.latent", "seg-2.latent"], "directory holds %s" % names)
    metas = [check_comfy_file(c, os.path.join(d, "seg-%d.latent" % i), n, {"frame_count": str(n)})[1]
             for i, n in ((0, 2), (1, 4), (2, 2))]
    td = [m.get("temporal_downscale") for m in metas]
    c.check(td == [None, "4", None], "pattern: temporal_downscale per segment %s, expected [None, '4', None]" % td)
    # The whole stream video: top level, no ranges.
    allv = os.path.join(d, "video.latent")
    r = run_child(c, tmp, "latent_caps", allv, [base + ",temporal-downscale=4"], 3)
    c.need(r["eos"] and not r["error"], "video: %s" % r)
    _, meta = check_comfy_file(c, allv, 3, {"temporal_downscale": "4", "framerate": "4/1"})
    c.check("ranges" not in meta, "video: ranges %s" % meta.get("ranges"))
    return "plain: ranges %s; pattern: segments %s" % (got, td)


CHILDREN = {"playing_limits": child_playing_limits, "flush_seek": child_flush_seek,
            "latent_caps": child_latent_caps}


def run_child(c, tmp, name, *args):
    """Runs CHILDREN[name](*args) in a child process (a crash there fails the case, not the script)."""
    out_json = os.path.join(tmp, "child-%s-%d.json" % (name, int(time.monotonic() * 1000)))
    p = subprocess.run([PYTHON, os.path.abspath(__file__), "--child", name, json.dumps(args), out_json],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    text = p.stdout.decode("utf-8", "replace")
    c.need(p.returncode == 0 and os.path.exists(out_json), "child %s exited %d:\n%s" % (name, p.returncode,
                                                                                     text[-3000:]))
    with open(out_json) as f:
        return json.load(f)


# ------------------------------------------------------------------ main

def main():
    if len(sys.argv) in (5, 6) and sys.argv[1] == "--appsrc-child":
        appsrc_child(*sys.argv[2:])
        return
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        result = CHILDREN[sys.argv[2]](*json.loads(sys.argv[3]))
        with open(sys.argv[4], "w") as f:
            json.dump(result, f)
        return
    sys.path.insert(0, HERE)
    import vae_reference as V

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gstvae-lfs-") as tmp:
        model = os.path.join(tmp, MODEL_NAME)
        V.make_checkpoint(model, layout="ldm", ch=32, mult=(1, 2, 2, 2), blocks=1, z=Z, seed=11)
        cases = [
            ("a. bit-exact .latent/.safetensors/.npy vs raw stream (Python + C++ readers)", case_bit_exact),
            ("b. ComfyUI LoadLatent layout and metadata", case_comfyui),
            ("b. scaled latent formats become raw in a .latent, stay in .safetensors", case_scaled_to_raw),
            ("c. segments by max-frames (and .npy pattern)", case_segments),
            ("c. segments by max-duration, start-index", case_duration),
            ("d. SIGKILL mid-stream leaves no final file; completed run leaves no temp file", case_kill),
            ("d. SIGINT without EOS finishes the file", case_interrupt),
            ("e. unwritable locations", case_bad_dirs),
            ("e. write failure (RLIMIT_FSIZE, SIGXFSZ not ignored)", case_disk_full),
            ("e. size change without a pattern -> error", case_caps_change_error),
            ("e. size change with a pattern -> two files", case_caps_change_pattern),
            ("f. examples/python/capture_latents.py", case_python_example),
            ("f. capture_latents.py --frames 0", case_python_example_zero),
            ("g. max-frames/max-duration set in PLAYING on a plain location: refused, nothing lost",
             case_playing_limits_plain),
            ("g. location that is a directory: error at start / at that segment", case_location_directory),
            ("g. extensions are case-insensitive", case_extension_case),
            ("g. the umask applies to the file mode", case_umask),
            ("g. source size change with the same latent size: segments or ranges", case_source_size_change),
            ("g. flushing seek: new segment or new range", case_flush_seek),
            ("g. leftover temporary files: warning at start, not deleted", case_leftover_temp),
            ("h. Wan video latents: temporal_downscale recorded", case_wan_metadata),
            ("h. a temporal-downscale change: new range or new segment", case_temporal_ranges),
            ("h. LTX-2's normalised latents: kept in .safetensors, refused for .latent/.npy", case_ltx2_normalised),
        ]
        if os.environ.get("GSTVAE_PROGRESS_EXAMPLE"):
            cases.append(("f. examples/c/progress", case_c_example))
        else:
            print("NOTE f. examples/c/progress not tested: GSTVAE_PROGRESS_EXAMPLE is not set")
        run_selected(cases, (model, tmp), "GSTVAE_LFS_CASES")
    finish(t0)


if __name__ == "__main__":
    main()
