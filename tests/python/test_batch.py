#!/usr/bin/env python3
"""gst-vae-batch tests: the contract of tools/batch.cpp (docs/scale-out.md), on real WebM clips.

Every case prints one PASS or FAIL line; the script exits non-zero if any
failed. Environment: GST_PLUGIN_PATH (the built plugin), GST_REGISTRY, and
GSTVAE_BATCH_TOOL (the built gst-vae-batch).

  a. shards are disjoint and complete through --shard I/N, Slurm array
     variables (with a SLURM_ARRAY_TASK_MIN), JOB_COMPLETION_INDEX + --shards
     and RANK/WORLD_SIZE; an item's shard is fnv1a64(key) % N; a real encode
     of every shard encodes each item exactly once; appended manifest lines
     do not move existing items
  b. outputs: frame counts and latent sizes, output names (same file name in
     two folders, "output" field), metadata batch_key/batch_fingerprint,
     --format npy (+ .json sidecar), --format safetensors, results rows,
     _SUCCESS, keys (relative paths, "..", symlinks, file:// URIs)
  c. idempotence: a rerun skips everything and touches nothing; a changed
     --latent-format, a truncated, a deleted output or a deleted .npy sidecar
     are encoded again
  d. SIGKILL mid-item leaves nothing under the final name and a rerun
     completes; SIGTERM mid-item exits 1 promptly with an "interrupted" row,
     no _SUCCESS, and a plain rerun completes
  e. bad items (missing, folder, text, corrupt, no video stream, duplicate,
     output collision, a 4x4 video: too small) are failed rows while good items (spaces and
     non-ASCII in the path, start/end ranges, --max-frames, --max-side)
     succeed; malformed manifest lines are usage errors naming the line;
     --retry-failed
  f. --summary merges shards; exit 0 only when every shard is present,
     succeeded, and nothing failed
  g. BENCH: the tool (one process, one model load) vs one gst-launch-1.0 per
     item; asserts "model loads: 1" (also with --jobs 2)
  i. issue 22: one runner per shard (a second run refuses on the shard's
     lock); --summary fails on results lines that do not parse; a folder as
     --manifest; a full disk or read-only output folder stops the run and
     leaves the items pending (tmpfs mounts, root only); video VAEs count
     input frames, latents and dropped frames and name the cause when no
     latent comes out; --device foo; dot-file outputs, NUL bytes and unknown
     JSON keys; gst-vae-latent-info --help

GSTVAE_BATCH_CASES=WORD[,WORD...] runs only the cases whose name holds one of
the words (for quick local runs); GSTVAE_BATCH_BENCH_ITEMS sets g's N (6).
"""
import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODEL_NAME = "tiny-vae-test.safetensors"
Z = 4  # latent channels of the test model
SHARD_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
              "SLURM_ARRAY_JOB_ID", "JOB_COMPLETION_INDEX", "RANK", "WORLD_SIZE", "LOCAL_RANK")
ROW_FIELDS = {"line", "input", "key", "output", "status", "frames", "latents", "dropped_frames", "shape", "seconds",
              "fps"}

from casekit import FAILED, RAN, Case, CheckFailed, finish, run_case, run_selected  # noqa: F401


# ------------------------------------------------------------------ helpers

def tool_path():
    return os.path.abspath(os.environ.get("GSTVAE_BATCH_TOOL") or os.path.join(ROOT, "build", "tools",
                                                                                "gst-vae-batch"))


def base_env(**extra):
    """The environment without any shard variable of the caller's own job, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in SHARD_VARS}
    # Some cases run the tool from another folder: relative plugin and registry paths would break there.
    for k in ("GST_PLUGIN_PATH", "GST_REGISTRY"):
        if env.get(k):
            env[k] = os.pathsep.join(os.path.abspath(x) for x in env[k].split(os.pathsep) if x)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Result:
    def __init__(self, rc, out, err, seconds):
        self.rc, self.out, self.err, self.seconds = rc, out, err, seconds

    def text(self, chars=3000):
        return ("exit %s\n--- stdout\n%s\n--- stderr\n%s" % (self.rc, self.out[-chars:], self.err[-chars:]))


def batch(args, env=None, cwd=None, timeout=120):
    """Runs gst-vae-batch ARGS; returns a Result (rc "hung" when it was killed after `timeout` seconds)."""
    t0 = time.monotonic()
    p = subprocess.Popen([tool_path()] + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env or base_env(), cwd=cwd)
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        rc = "hung (killed after %d s)" % timeout
    return Result(rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), time.monotonic() - t0)


def batch_ok(c, args, rc=0, **kw):
    r = batch(args, **kw)
    c.need(r.rc == rc, "gst-vae-batch %s: expected exit %d\n%s" % (" ".join(map(str, args)), rc, r.text()))
    return r


def encode_args(manifest, model, out, *extra):
    # A corrupt file can stop matroskademux without an error reaching the
    # pipeline's bus (about 1 run in 3 here): the stall watchdog then fails the
    # item. 10 s keeps such a run well inside the 60 s this test allows.
    return ["--manifest", manifest, "--model", model, "--out-dir", out, "--stall-timeout", "10"] + list(extra)


def dry_run(c, manifest, model, out, *extra, env=None):
    """The --dry-run lines as dicts."""
    r = batch_ok(c, encode_args(manifest, model, out, "--dry-run", *extra), env=env)
    rows = []
    for l in r.out.splitlines():
        if l.strip():
            try:
                rows.append(json.loads(l))
            except ValueError:
                c.need(False, "--dry-run printed a line that is not JSON: %r" % l)
    return rows


def results(out, shard=0, shards=1):
    path = os.path.join(out, "_results", "shard-%d-of-%d.jsonl" % (shard, shards))
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def success_marker(out, shard=0, shards=1):
    return os.path.join(out, "_results", "shard-%d-of-%d._SUCCESS" % (shard, shards))


def by_line(rows):
    return {r["line"]: r for r in rows}


def fnv1a64(text):
    h = 0xcbf29ce484222325
    for b in text.encode("utf-8"):
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def model_loads(c, r):
    """N of the last stderr line "... model loads: N"."""
    lines = [l for l in r.err.splitlines() if l.strip()]
    m = re.search(r"model loads: (-?\d+)\s*$", lines[-1]) if lines else None
    c.need(m, "the last stderr line is not 'model loads: N':\n%s" % r.err[-1500:])
    return int(m.group(1))


def read_header(path):
    """A .latent/.safetensors file: (metadata, latent_tensor shape, whole) from its header; whole = size matches."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    info = header["latent_tensor"]
    a, b = info["data_offsets"]
    whole = (8 + n + max(bb for _, bb in (t["data_offsets"] for t in header.values())) == len(blob)
             and b - a == 4 * int(np.prod(info["shape"])))
    return meta, info["shape"], whole


def read_tensor(path):
    if path.endswith(".npy"):
        return np.load(path)
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack_from("<Q", blob, 0)
    info = json.loads(blob[8:8 + n].decode("utf-8"))["latent_tensor"]
    a, b = info["data_offsets"]
    return np.frombuffer(blob[8 + n + a:8 + n + b], "<f4").reshape(info["shape"])


def make_clip(path, frames, w, h, fps=10, pattern=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    p = subprocess.run(["gst-launch-1.0", "-q", "videotestsrc", "pattern=%d" % pattern, "num-buffers=%d" % frames,
                        "!", "video/x-raw,width=%d,height=%d,framerate=%d/1" % (w, h, fps), "!", "vp8enc", "!",
                        "webmmux", "!", "filesink", "location=" + path],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    if p.returncode != 0 or not os.path.getsize(path):
        raise RuntimeError("cannot make %s: %s" % (path, p.stdout.decode("utf-8", "replace")))
    return path


def make_audio_only(path):
    p = subprocess.run(["gst-launch-1.0", "-q", "audiotestsrc", "num-buffers=10", "!", "vorbisenc", "!", "webmmux",
                        "!", "filesink", "location=" + path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=120)
    if p.returncode != 0:
        raise RuntimeError("cannot make %s: %s" % (path, p.stdout.decode("utf-8", "replace")))
    return path


def write_manifest(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(l + "\n" for l in lines))
    return path


def hidden_files(d):
    return sorted(n for n in os.listdir(d) if n.startswith(".")) if os.path.isdir(d) else []


def mtimes(paths):
    return {p: os.stat(p).st_mtime_ns for p in paths}


# ------------------------------------------------------------------ a

SHARD_CLIPS = 12


SHARDS = 3


def shard_clip_names(d):
    """SHARD_CLIPS clip names whose keys (absolute paths under the random
    temporary folder `d`) fall SHARD_CLIPS / SHARDS into each of SHARDS shards
    by the tool's rule, so that no run meets an empty shard by chance (12
    arbitrary names leave one empty about once in 40 runs)."""
    per_shard = {i: [] for i in range(SHARDS)}
    k = 0
    while sum(len(v) for v in per_shard.values()) < SHARD_CLIPS:
        name = "c%03d.webm" % k
        shard = fnv1a64(os.path.join(d, "clips", name)) % SHARDS
        if len(per_shard[shard]) < SHARD_CLIPS // SHARDS:
            per_shard[shard].append(name)
        k += 1
    return sorted(n for v in per_shard.values() for n in v)


def shard_manifest(tmp):
    """12 clips of 5 frames (64x48) under tmp/a/clips; the manifest lists them relative to its folder."""
    d = os.path.join(tmp, "a")
    lines = ["# clips for the shard tests", ""]
    for i, name in enumerate(shard_clip_names(d)):
        make_clip(os.path.join(d, "clips", name), 5, 64, 48, pattern=i % 20)
        lines.append("clips/" + name)
    return write_manifest(os.path.join(d, "manifest.txt"), lines), d


def case_shards(c, model, tmp):
    manifest, d = shard_manifest(tmp)
    out = os.path.join(d, "out")
    n = SHARDS
    keys = {os.path.join(d, "clips", name) for name in shard_clip_names(d)}
    ways = {
        "--shard": lambda i: ([ "--shard", "%d/%d" % (i, n)], base_env()),
        "Slurm (MIN 1)": lambda i: ([], base_env(SLURM_ARRAY_TASK_ID=i + 1, SLURM_ARRAY_TASK_COUNT=n,
                                                 SLURM_ARRAY_TASK_MIN=1, SLURM_ARRAY_TASK_MAX=n)),
        "JOB_COMPLETION_INDEX": lambda i: (["--shards", n], base_env(JOB_COMPLETION_INDEX=i)),
        "RANK/WORLD_SIZE": lambda i: ([], base_env(RANK=i, WORLD_SIZE=n)),
    }
    reference = None
    for way, make in ways.items():
        shards = []
        for i in range(n):
            extra, env = make(i)
            rows = dry_run(c, manifest, model, out, *extra, env=env)
            shards.append([r["key"] for r in rows])
            wrong = [(r["key"], fnv1a64(r["key"]) % n) for r in rows if fnv1a64(r["key"]) % n != i]
            c.check(not wrong, "%s: in shard %d of %d, but fnv1a64(key) %% %d says otherwise: %s"
                    % (way, i, n, n, wrong))
            for r in rows:
                c.check(r["action"] == "encode", "%s: dry run of a fresh out-dir says %r" % (way, r["action"]))
                c.check(set(r) == {"line", "input", "key", "output", "action"}, "dry-run fields %s" % sorted(r))
        flat = [k for s in shards for k in s]
        c.check(len(flat) == len(set(flat)), "%s: shards overlap: %s" % (way, shards))
        c.check(set(flat) == keys, "%s: shards cover %s, expected %s" % (way, sorted(set(flat)), sorted(keys)))
        c.check(all(shards), "%s: an empty shard among %s (unlucky hash or bad split)" % (way, [len(s) for s in shards]))
        if reference is None:
            reference = shards
        c.check(shards == reference, "%s splits differently from --shard: %s vs %s" % (way, shards, reference))
    c.check(not os.path.exists(out), "--dry-run wrote %s" % out)

    # Precedence: --shard over Slurm over JOB_COMPLETION_INDEX over RANK.
    slurm0 = dict(SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_COUNT=n, SLURM_ARRAY_TASK_MIN=1)
    both = [r["key"] for r in dry_run(c, manifest, model, out, "--shard", "2/%d" % n,
                                      env=base_env(RANK=0, WORLD_SIZE=n, **slurm0))]
    c.check(both == reference[2], "--shard 2/3 with Slurm and RANK set: %s, expected shard 2" % both)
    both = [r["key"] for r in dry_run(c, manifest, model, out, env=base_env(RANK=2, WORLD_SIZE=n, **slurm0))]
    c.check(both == reference[0], "Slurm (task 1, min 1) with RANK=2 set: %s, expected shard 0" % both)
    both = [r["key"] for r in dry_run(c, manifest, model, out, "--shards", n,
                                      env=base_env(JOB_COMPLETION_INDEX=1, RANK=2, WORLD_SIZE=n))]
    c.check(both == reference[1], "JOB_COMPLETION_INDEX=1 with RANK=2 set: %s, expected shard 1" % both)
    single = [r["key"] for r in dry_run(c, manifest, model, out)]
    c.check(sorted(single) == sorted(keys), "no shard variables: %d items, expected all %d" % (len(single), len(keys)))
    r = batch(encode_args(manifest, model, out, "--dry-run"), env=base_env(JOB_COMPLETION_INDEX=0))
    c.check(r.rc == 2, "JOB_COMPLETION_INDEX without --shards: expected exit 2\n%s" % r.text())
    r = batch(encode_args(manifest, model, out, "--dry-run", "--shard", "3/3"))
    c.check(r.rc == 2, "--shard 3/3: expected exit 2\n%s" % r.text())

    # A real encode of every shard, each named another way; --jobs 2 on one of them.
    runs = [(["--shard", "0/%d" % n, "--jobs", 2], base_env()),
            ([], base_env(SLURM_ARRAY_TASK_ID=2, SLURM_ARRAY_TASK_COUNT=n, SLURM_ARRAY_TASK_MIN=1)),
            (["--shards", n], base_env(JOB_COMPLETION_INDEX=2))]
    encoded = {}
    for i, (extra, env) in enumerate(runs):
        r = batch_ok(c, encode_args(manifest, model, out, *extra), env=env)
        c.check(model_loads(c, r) == 1, "shard %d: model loads != 1\n%s" % (i, r.err[-800:]))
        c.check(os.path.exists(success_marker(out, i, n)), "no shard-%d-of-%d._SUCCESS" % (i, n))
        rows = results(out, i, n)
        c.check(sorted(x["key"] for x in rows) == sorted(reference[i]),
                "shard %d's results hold %s, its dry run said %s" % (i, [x["key"] for x in rows], reference[i]))
        for x in rows:
            c.check(x["status"] == "ok", "shard %d: %s" % (i, x))
            encoded.setdefault(x["key"], []).append(x["output"])
    c.check(sorted(encoded) == sorted(keys) and all(len(v) == 1 for v in encoded.values()),
            "items encoded per key: %s" % {k: len(v) for k, v in encoded.items()})
    files = sorted(f for f in os.listdir(out) if not f.startswith("_"))
    c.check(len(files) == len(keys), "out-dir holds %d files for %d items: %s" % (len(files), len(keys), files))
    for k, outs in encoded.items():
        meta, shape, whole = read_header(outs[0])
        c.check(meta.get("batch_key") == k and whole and shape[0] == 5,
                "%s: batch_key %r, shape %s, whole %s" % (outs[0], meta.get("batch_key"), shape, whole))

    # Appending lines moves nothing: the old items keep their shard (and are now skipped).
    more = []
    for i in range(4):
        more.append("clips/extra%d.webm" % i)
        make_clip(os.path.join(d, more[-1]), 5, 64, 48, pattern=i)
    with open(manifest, "a", encoding="utf-8") as f:
        f.write("".join(l + "\n" for l in more))
    moved, new_keys = [], set()
    for i in range(n):
        rows = dry_run(c, manifest, model, out, "--shard", "%d/%d" % (i, n))
        old = [r["key"] for r in rows if r["key"] in keys]
        if old != reference[i]:
            moved.append((i, old, reference[i]))
        for r in rows:
            want = "skip" if r["key"] in keys else "encode"
            c.check(r["action"] == want, "after appending: %s is %r, expected %r" % (r["key"], r["action"], want))
            if r["key"] not in keys:
                new_keys.add(r["key"])
    c.check(not moved, "appending lines moved items between shards: %s" % moved)
    c.check(len(new_keys) == len(more), "the appended items landed in %d shards' lists, expected %d"
            % (len(new_keys), len(more)))
    return "splits %s, same by all four ways; 12 items encoded once each" % [len(s) for s in reference]


# ------------------------------------------------------------------ b, c

def outputs_setup(tmp):
    d = os.path.join(tmp, "b")
    make_clip(os.path.join(d, "one", "same.webm"), 7, 64, 48, pattern=0)
    make_clip(os.path.join(d, "two", "same.webm"), 12, 80, 64, pattern=1)
    make_clip(os.path.join(d, "three.webm"), 9, 96, 72, pattern=18)  # 96x72 -> 12x9 latents
    make_clip(os.path.join(d, "four.webm"), 6, 72, 56, pattern=2)   # cropped to 72x56 -> 9x7
    os.symlink(os.path.join(d, "three.webm"), os.path.join(d, "link.webm"))
    os.makedirs(os.path.join(d, "lists"))
    uri = "file://" + urllib.parse.quote(os.path.join(d, "four.webm"))
    manifest = write_manifest(os.path.join(d, "lists", "m.txt"), [
        "../one/same.webm",
        "  ../two/./same.webm  ",
        os.path.join(d, "three.webm"),
        "../link.webm",
        uri,
        json.dumps({"input": "../three.webm", "output": "named/three-named.latent", "start": 0}),
    ])
    expect = {  # line -> (key, frames, latent h, w, stem)
        1: (os.path.join(d, "one", "same.webm"), 7, 6, 8, "same"),
        2: (os.path.join(d, "two", "same.webm"), 12, 8, 10, "same"),
        3: (os.path.join(d, "three.webm"), 9, 9, 12, "three"),
        4: (os.path.join(d, "link.webm"), 9, 9, 12, "link"),
        5: (uri, 6, 7, 9, "four"),
        6: (os.path.join(d, "three.webm") + "#t=0,", 9, 9, 12, None),
    }
    return d, manifest, expect


B = {}


def case_outputs(c, model, tmp):
    d, manifest, expect = outputs_setup(tmp)
    out = os.path.join(d, "out")
    r = batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4), cwd=tmp)
    c.check(model_loads(c, r) == 1, "model loads != 1")
    B.update(d=d, manifest=manifest, out=out, expect=expect)
    c.check(os.path.exists(success_marker(out)) and os.path.getsize(success_marker(out)) == 0,
            "no empty _results/shard-0-of-1._SUCCESS")
    rows = results(out)
    c.need(sorted(x["line"] for x in rows) == sorted(expect), "rows for lines %s" % [x["line"] for x in rows])
    got = by_line(rows)
    for line, (key, frames, h, w, stem) in expect.items():
        x = got[line]
        c.check(set(x) == ROW_FIELDS, "line %d: row fields %s, expected %s (no error on ok rows)"
                % (line, sorted(x), sorted(ROW_FIELDS)))
        c.check(x["status"] == "ok" and x["frames"] == frames and x["shape"] == [Z, h, w],
                "line %d: %s; expected ok, %d frames, shape %s" % (line, x, frames, [Z, h, w]))
        c.check(x["key"] == key, "line %d: key %r, expected %r" % (line, x["key"], key))
        c.check(isinstance(x["seconds"], float) and x["seconds"] > 0 and isinstance(x["fps"], (int, float))
                and x["fps"] > 0, "line %d: seconds %r, fps %r" % (line, x["seconds"], x["fps"]))
        if stem:
            want = os.path.join(out, "%s-%016x.latent" % (stem, fnv1a64(key)))
            c.check(x["output"] == want, "line %d: output %r, expected %r" % (line, x["output"], want))
        else:
            c.check(x["output"] == os.path.join(out, "named", "three-named.latent"),
                    "line %d: output %r, expected DIR/named/three-named.latent" % (line, x["output"]))
        if not os.path.exists(x["output"]):
            c.check(False, "line %d: %s does not exist" % (line, x["output"]))
            continue
        meta, shape, whole = read_header(x["output"])
        c.check(whole, "%s: the data does not match the header's size" % x["output"])
        c.check(shape == [frames, Z, h, w], "%s: latent_tensor %s, expected %s" % (x["output"], shape,
                                                                                  [frames, Z, h, w]))
        c.check(meta.get("batch_key") == key, "%s: batch_key %r, expected %r" % (x["output"], meta.get("batch_key"),
                                                                                  key))
        c.check(re.fullmatch(r"[0-9a-f]{16}", meta.get("batch_fingerprint", "")),
                "%s: batch_fingerprint %r" % (x["output"], meta.get("batch_fingerprint")))
        c.check(meta.get("frame_count") == str(frames), "%s: frame_count %r (latentfilesink's own metadata lost?)"
                % (x["output"], meta.get("frame_count")))
    c.check(got[1]["output"] != got[2]["output"], "two same.webm in different folders share %s" % got[1]["output"])
    fps = {read_header(got[l]["output"])[0].get("batch_fingerprint") for l in expect if os.path.exists(got[l]["output"])}
    c.check(len(fps) == len(expect), "batch_fingerprint is not unique per item: %d distinct of %d" % (len(fps),
                                                                                                  len(expect)))
    # The symlink and its target are two items with the same pixels.
    if os.path.exists(got[3]["output"]) and os.path.exists(got[4]["output"]):
        c.check(np.array_equal(read_tensor(got[3]["output"]), read_tensor(got[4]["output"])),
                "link.webm and three.webm encode differently")
    left = [f for f in os.listdir(out) if f.startswith(".")] + hidden_files(os.path.join(out, "named"))
    c.check(not left, "a completed run left hidden files: %s" % left)

    # --format npy (sidecar) and --format safetensors on the same manifest.
    ref = read_tensor(got[1]["output"]) if os.path.exists(got[1]["output"]) else None
    for fmt in ("npy", "safetensors"):
        o2 = os.path.join(d, "out-" + fmt)
        m2 = write_manifest(os.path.join(d, "lists", "m-%s.txt" % fmt), ["../one/same.webm", "../two/same.webm"])
        batch_ok(c, encode_args(m2, model, o2, "--format", fmt))
        rows = by_line(results(o2))
        for line in (1, 2):
            key, frames, h, w, stem = expect[line]
            x = rows[line]
            want = os.path.join(o2, "%s-%016x.%s" % (stem, fnv1a64(key), fmt))
            c.check(x["status"] == "ok" and x["output"] == want and x["frames"] == frames,
                    "%s line %d: %s, expected ok, %s, %d frames" % (fmt, line, x, want, frames))
            if not os.path.exists(want):
                c.check(False, "%s does not exist" % want)
                continue
            a = read_tensor(want)
            c.check(a.shape == (frames, Z, h, w), "%s: shape %s" % (want, a.shape))
            if fmt == "npy":
                side = want + ".json"
                c.need(os.path.exists(side), "no sidecar %s" % side)
                with open(side) as f:
                    j = json.load(f)
                c.check(set(j) >= {"batch_key", "batch_fingerprint", "frames"} and j["batch_key"] == key
                        and j["frames"] == frames and re.fullmatch(r"[0-9a-f]{16}", j["batch_fingerprint"]),
                        "%s: %s" % (side, j))
            else:
                meta, _, _ = read_header(want)
                c.check(meta.get("batch_key") == key, "%s: batch_key %r" % (want, meta.get("batch_key")))
            if line == 1 and ref is not None:
                c.check(np.array_equal(a, ref), "%s differs from the .latent of the same clip" % want)
        c.check(sorted(f for f in os.listdir(o2) if f != "_results") ==
                sorted(os.path.basename(rows[l]["output"]) + s for l in (1, 2)
                       for s in ((".json", "") if fmt == "npy" else ("",))),
                "%s out-dir: %s" % (fmt, os.listdir(o2)))
    return "6 items (same name in two folders, '..', symlink, file:// URI, output field); npy + sidecar"


def case_rerun(c, model, tmp):
    c.need(B, "needs case b's outputs")
    out, manifest, expect = B["out"], B["manifest"], B["expect"]
    rows = by_line(results(out))
    outs = [rows[l]["output"] for l in sorted(rows)]
    before = mtimes(outs)
    time.sleep(0.02)
    r = batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4))
    again = by_line(results(out))
    for line, (key, frames, h, w, _) in expect.items():
        x = again.get(line, {})
        c.check(x.get("status") == "skipped" and x.get("frames") == frames and x.get("shape") == [Z, h, w],
                "rerun, line %d: %s; expected skipped with %d frames, shape %s" % (line, x, frames, [Z, h, w]))
    c.check(mtimes(outs) == before, "a rerun touched outputs: %s vs %s" % (mtimes(outs), before))
    c.check(os.path.exists(success_marker(out)), "no _SUCCESS after a rerun that skipped everything")
    c.check(all(a["action"] == "skip" for a in dry_run(c, manifest, model, out)), "dry run after success: not all skip")

    # Another --latent-format: everything is encoded again, with another fingerprint.
    fp_raw = {o: read_header(o)[0].get("batch_fingerprint") for o in outs}
    raw1 = read_tensor(outs[0])
    batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4, "--latent-format", "sd15"))
    x = by_line(results(out))
    c.check(all(x[l]["status"] == "ok" for l in expect), "--latent-format sd15: %s" % [x[l]["status"] for l in x])
    c.check(all(mtimes([o])[o] != before[o] for o in outs), "--latent-format sd15 left outputs untouched")
    c.check(all(read_header(o)[0].get("batch_fingerprint") != fp_raw[o] for o in outs),
            "--latent-format sd15 kept a fingerprint")
    c.check(not np.array_equal(read_tensor(outs[0]), raw1), "sd15 latents equal the raw ones")
    r = batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4, "--latent-format", "sd15"))
    c.check(all(x["status"] == "skipped" for x in results(out)), "sd15 twice: not all skipped")
    batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4))
    c.check(all(x["status"] == "ok" for x in results(out)), "back to raw: not all encoded again")
    c.check(np.array_equal(read_tensor(outs[0]), raw1), "raw again differs from the first raw encode")

    # A truncated output and a deleted one are encoded again; the others are skipped.
    trunc, gone = rows[2]["output"], rows[3]["output"]
    size = os.path.getsize(trunc)
    with open(trunc, "r+b") as f:
        f.truncate(size // 2)
    os.unlink(gone)
    before = mtimes([o for o in outs if o != gone])
    plan = {a["output"]: a["action"] for a in dry_run(c, manifest, model, out, "--per-batch", 4)}
    c.check(plan.get(trunc) == "encode" and plan.get(gone) == "encode",
            "dry run: truncated %r, deleted %r (expected encode)" % (plan.get(trunc), plan.get(gone)))
    batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4))
    x = by_line(results(out))
    for line in expect:
        want = "ok" if rows[line]["output"] in (trunc, gone) else "skipped"
        c.check(x[line]["status"] == want, "after truncate/delete, line %d: %s, expected %s" % (line, x[line], want))
    for o in (trunc, gone):
        c.check(os.path.exists(o) and read_header(o)[2], "%s is not whole again" % o)
    c.check(os.path.getsize(trunc) == size, "the redone file has %d bytes, was %d" % (os.path.getsize(trunc), size))
    for o, t in before.items():
        if o != trunc:
            c.check(os.stat(o).st_mtime_ns == t, "%s was rewritten, expected skipped" % o)

    # .npy: a deleted sidecar or a truncated .npy is encoded again.
    o2 = os.path.join(B["d"], "out-npy")
    m2 = os.path.join(B["d"], "lists", "m-npy.txt")
    x = by_line(results(o2))
    os.unlink(x[1]["output"] + ".json")
    with open(x[2]["output"], "r+b") as f:
        f.truncate(os.path.getsize(x[2]["output"]) // 2)
    batch_ok(c, encode_args(m2, model, o2, "--format", "npy"))
    y = by_line(results(o2))
    c.check(y[1]["status"] == "ok" and y[2]["status"] == "ok" and os.path.exists(x[1]["output"] + ".json"),
            "npy without sidecar / truncated npy: %s %s" % (y[1], y[2]))
    batch_ok(c, encode_args(m2, model, o2, "--format", "npy"))
    c.check(all(r["status"] == "skipped" for r in results(o2)), "npy rerun: not all skipped")
    return "skip, sd15, truncated, deleted, npy sidecar"


# ------------------------------------------------------------------ d

def long_setup(tmp):
    d = os.path.join(tmp, "d")
    clip = make_clip(os.path.join(d, "long.webm"), 300, 128, 96, fps=30, pattern=18)
    short = make_clip(os.path.join(d, "short.webm"), 5, 64, 48)
    return d, write_manifest(os.path.join(d, "m.txt"), ["long.webm", "short.webm"]), clip, short


def start_and_wait_staging(c, args, out, log):
    """Starts the tool; returns (process, hidden file names) once a hidden file appears in `out`."""
    p = subprocess.Popen([tool_path()] + [str(a) for a in args], stdout=log, stderr=log, env=base_env())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        h = hidden_files(out)
        if h:
            time.sleep(0.3)  # a few batches into the item
            return p, h
        if p.poll() is not None:
            break
        time.sleep(0.02)
    p.kill()
    p.wait()
    c.need(False, "no hidden staging file appeared in %s (tool exit %s)" % (out, p.poll()))


def case_kill(c, model, tmp):
    d, manifest, clip, _ = long_setup(tmp)
    out = os.path.join(d, "out-kill")
    plan = dry_run(c, manifest, model, out, "--per-batch", 4)
    final = plan[0]["output"]
    with open(os.path.join(d, "kill.log"), "wb") as log:
        p, staged = start_and_wait_staging(c, encode_args(manifest, model, out, "--per-batch", 4), out, log)
        c.check(not os.path.exists(final), "%s exists while its item runs" % final)
        p.kill()
        p.wait()
    c.check(not os.path.exists(final), "SIGKILL mid-item left %s" % final)
    c.check(not os.path.exists(success_marker(out)), "SIGKILL mid-item left a _SUCCESS")
    left = hidden_files(out)
    r = batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4))
    x = by_line(results(out))
    c.check(x[1]["status"] == "ok" and x[1]["frames"] == 300 and x[2]["status"] == "ok",
            "rerun after SIGKILL: %s" % list(x.values()))
    c.check(os.path.exists(final) and read_header(final)[1] == [300, Z, 12, 16], "%s after the rerun: %s"
            % (final, read_header(final)[1] if os.path.exists(final) else "missing"))
    c.check(os.path.exists(success_marker(out)), "no _SUCCESS after the rerun")
    # The rerun removes what the killed run (a dead process on this host) left.
    after = hidden_files(out)
    c.check(not after, "hidden files after the rerun: %s (the killed run left %s)" % (after, left))
    return "staged %s; after SIGKILL the out-dir kept %s; the rerun removed them" % (staged, left)


def case_zombie_leftovers(c, model, tmp):
    """A run killed with its parent (a SIGKILLed Ray worker) is a zombie until something reaps it;
    a rerun in that window must count it as dead and remove its staging files, and keep those of a
    live run."""
    d = os.path.join(tmp, "z")
    make_clip(os.path.join(d, "a.webm"), 3, 64, 48)
    manifest = write_manifest(os.path.join(d, "m.txt"), ["a.webm"])
    out = os.path.join(d, "out")
    os.makedirs(out)
    name = os.path.basename(dry_run(c, manifest, model, out)[0]["output"])
    host = socket.gethostname().replace("/", "_").replace("-", "_")
    zombie = subprocess.Popen(["true"])  # not waited for: a zombie until the end of this case
    live = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open("/proc/%d/stat" % zombie.pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.02)
        else:
            c.need(False, "pid %d did not become a zombie" % zombie.pid)
        files = {}
        for who, pid in (("zombie", zombie.pid), ("live", live.pid)):
            staging = ".%s.inprogress-%s-%d.latent" % (name, host, pid)
            files[who] = [staging, "." + staging + ".partial-Ab12Cd"]
            for f in files[who]:
                open(os.path.join(out, f), "wb").close()
        batch_ok(c, encode_args(manifest, model, out))
        left = hidden_files(out)
        c.check(not set(files["zombie"]) & set(left), "a zombie's (pid %d) files were kept: %s" % (zombie.pid, left))
        c.check(set(files["live"]) <= set(left), "a live run's (pid %d) files were removed: %s" % (live.pid, left))
    finally:
        live.kill()
        live.wait()
        zombie.wait()
    return "the zombie's 2 files removed, the live run's 2 kept"


def case_term(c, model, tmp):
    d = os.path.join(tmp, "d")
    manifest = os.path.join(d, "m.txt")
    c.need(os.path.exists(manifest), "needs case d's clips")
    out = os.path.join(d, "out-term")
    final = dry_run(c, manifest, model, out, "--per-batch", 4)[0]["output"]
    logp = os.path.join(d, "term.log")
    with open(logp, "wb") as log:
        p, _ = start_and_wait_staging(c, encode_args(manifest, model, out, "--per-batch", 4), out, log)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = None
        dt = time.monotonic() - t0
    with open(logp, "rb") as f:
        log = f.read().decode("utf-8", "replace")
    c.check(rc == 1, "SIGTERM: exit %s, expected 1\n%s" % (rc, log[-1500:]))
    c.check(dt < 5, "SIGTERM: took %.1f s to exit" % dt)
    c.check(not os.path.exists(final), "SIGTERM left %s" % final)
    c.check(not os.path.exists(success_marker(out)), "SIGTERM left a _SUCCESS")
    rows = results(out)
    c.check(len(rows) >= 1 and rows[0]["line"] == 1 and rows[0]["status"] == "failed"
            and rows[0].get("error") == "interrupted", "rows after SIGTERM: %s" % rows)
    c.check(all(r["line"] != 2 for r in rows), "the item after the interrupted one ran: %s" % rows)
    left = hidden_files(out)
    # A plain rerun resumes (spec: "A rerun resumes").
    r = batch(encode_args(manifest, model, out, "--per-batch", 4))
    x = by_line(results(out))
    c.check(r.rc == 0 and x.get(1, {}).get("status") == "ok" and x.get(2, {}).get("status") == "ok",
            "plain rerun after SIGTERM: %s\n%s" % (list(x.values()), r.text(1200)))
    if r.rc != 0:
        r = batch(encode_args(manifest, model, out, "--per-batch", 4, "--retry-failed"))
        x = by_line(results(out))
        c.check(r.rc == 0 and x.get(1, {}).get("status") == "ok",
                "rerun with --retry-failed after SIGTERM: %s" % list(x.values()))
    c.check(os.path.exists(final) and read_header(final)[1][0] == 300, "%s after the rerun" % final)
    c.check(os.path.exists(success_marker(out)), "no _SUCCESS after the rerun")
    return "exit %s after %.2f s; hidden files left by SIGTERM: %s" % (rc, dt, left or "none")


# ------------------------------------------------------------------ e

E = {}


def case_bad_items(c, model, tmp):
    d = os.path.join(tmp, "e")
    odd = os.path.join(d, "dir with space", "clïp ü – 視頻.webm")
    make_clip(os.path.join(d, "good.webm"), 6, 64, 48)
    make_clip(odd, 8, 64, 48, pattern=5)
    make_clip(os.path.join(d, "ranged.webm"), 30, 64, 48, fps=10, pattern=1)
    make_clip(os.path.join(d, "g2.webm"), 5, 64, 48, pattern=2)
    make_clip(os.path.join(d, "g3.webm"), 5, 64, 48, pattern=3)
    os.makedirs(os.path.join(d, "folder.webm"))
    with open(os.path.join(d, "text.webm"), "w") as f:
        f.write("this is not a video\n" * 20)
    with open(os.path.join(d, "good.webm"), "rb") as f:
        blob = f.read()
    rnd = np.random.default_rng(3)
    with open(os.path.join(d, "corrupt.webm"), "wb") as f:  # the EBML header, then noise
        f.write(blob[:60] + rnd.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    make_audio_only(os.path.join(d, "audio.webm"))
    p = subprocess.run(["gst-launch-1.0", "-q", "videotestsrc", "num-buffers=5", "!",
                        "video/x-raw,format=I420,width=4,height=4,framerate=10/1", "!", "matroskamux", "!",
                        "filesink", "location=" + os.path.join(d, "tiny.mkv")], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)  # vp8enc refuses 4x4: raw video in Matroska
    c.need(p.returncode == 0, "cannot make tiny.mkv: %s" % p.stdout[-500:])
    lines = [
        "good.webm",                                                               # 1
        "missing.webm",                                                            # 2
        "folder.webm",                                                             # 3
        "text.webm",                                                               # 4
        "corrupt.webm",                                                            # 5
        "  # a comment",                                                           # 6
        "./good.webm",                                                             # 7 duplicate of 1
        os.path.relpath(odd, d),                                                   # 8
        json.dumps({"input": "ranged.webm", "start": 0.5, "end": 1.5}),             # 9
        "",                                                                        # 10
        json.dumps({"input": "g2.webm", "output": "sub/x.latent"}),                 # 11
        json.dumps({"input": "g3.webm", "output": "sub/x.latent"}),                 # 12 collides with 11
        "audio.webm",                                                              # 13
        json.dumps({"input": "ranged.webm", "start": 2}),                           # 14
        "tiny.mkv",                                                                # 15: 4x4, too small
    ]
    manifest = write_manifest(os.path.join(d, "m.txt"), lines)
    out = os.path.join(d, "out")
    plan = dry_run(c, manifest, model, out)
    c.check([a["line"] for a in plan] == [1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 14, 15],
            "dry-run lines %s" % [a["line"] for a in plan])
    # "failed": a manifest line that fails without encoding (a duplicate, a colliding output).
    acts = ("encode", "skip", "failed-before", "failed")
    c.check(all(a["action"] in acts for a in plan),
            "dry-run actions outside %s: %s" % ("|".join(acts), [(a["line"], a["action"]) for a in plan
                                                                  if a["action"] not in acts]))
    # A bad item must fail, not stall the shard: 12 tiny items take about 2 s.
    r = batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4), rc=1, timeout=60)
    c.check(model_loads(c, r) == 1, "model loads != 1")
    c.check(not os.path.exists(success_marker(out)), "_SUCCESS despite failed rows")
    x = by_line(results(out))
    c.need(sorted(x) == [1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 14, 15], "rows for lines %s" % sorted(x))
    good = {1: 6, 8: 8, 9: 10, 11: 5, 14: 10}  # line -> frames ([0.5, 1.5) and [2, 3) at 10 fps: 10 each)
    for line, frames in good.items():
        c.check(x[line]["status"] == "ok" and x[line]["frames"] == frames and x[line]["shape"] == [Z, 6, 8],
                "line %d: %s; expected ok with %d frames" % (line, x[line], frames))
        if x[line]["status"] == "ok":
            c.check(read_header(x[line]["output"])[1] == [frames, Z, 6, 8],
                    "line %d: file shape %s" % (line, read_header(x[line]["output"])[1]))
    c.check(x[8]["input"] == os.path.relpath(odd, d) and x[8]["key"] == odd,
            "line 8: input %r key %r" % (x[8]["input"], x[8]["key"]))
    c.check(os.path.basename(x[8]["output"]).startswith("clïp ü – 視頻-"), "line 8: output %r" % x[8]["output"])
    c.check(x[9]["key"] == os.path.join(d, "ranged.webm") + "#t=0.5,1.5", "line 9: key %r" % x[9]["key"])
    c.check(x[14]["key"] == os.path.join(d, "ranged.webm") + "#t=2,", "line 14: key %r" % x[14]["key"])
    c.check(x[11]["output"] == os.path.join(out, "sub", "x.latent"), "line 11: output %r" % x[11]["output"])
    if x[9]["status"] == "ok":
        meta = read_header(x[9]["output"])[0]
        c.check(int(meta.get("first_pts_ns", "-1")) == 500000000,
                "line 9: first_pts_ns %r, expected 500000000" % meta.get("first_pts_ns"))
    bad = {2: ["missing.webm"], 3: ["directory"], 4: [], 5: [], 7: ["duplicate of line 1"],
           12: ["output collides with line 11"], 13: ["video"], 15: ["small"]}
    errors = {}
    for line, needles in bad.items():
        e = x[line].get("error", "")
        errors[line] = e
        c.check(x[line]["status"] == "failed" and e and x[line]["frames"] == 0 and x[line]["shape"] is None,
                "line %d: %s; expected a failed row with an error, 0 frames, shape null" % (line, x[line]))
        for n in needles:
            c.check(n in e, "line %d: error %r does not mention %r" % (line, e, n))
    c.check("No such file" in errors[2] or "not found" in errors[2].lower() or "does not exist" in errors[2],
            "line 2: error %r does not say the file is missing" % errors[2])
    c.check(not os.path.exists(os.path.join(out, "sub", "x.latent")) or
            read_header(os.path.join(out, "sub", "x.latent"))[0].get("batch_key") == os.path.join(d, "g2.webm"),
            "sub/x.latent was overwritten by the colliding line 12")
    for line in bad:
        c.check(not os.path.exists(x[line]["output"]) or line in (7, 12), "failed line %d left %s"
                % (line, x[line]["output"]))
    E.update(d=d, manifest=manifest, out=out, rows=x, lines=lines)
    return "errors: " + "; ".join("%d: %s" % (l, e[:90]) for l, e in sorted(errors.items()))


def case_options(c, model, tmp):
    d = os.path.join(tmp, "e2")
    make_clip(os.path.join(d, "big.webm"), 10, 128, 96, pattern=0)
    make_clip(os.path.join(d, "small.webm"), 10, 64, 48, pattern=1)
    manifest = write_manifest(os.path.join(d, "m.txt"), ["big.webm", "small.webm"])
    cases = [  # options -> {line: (frames, h, w)}
        (["--max-frames", 3], {1: (3, 12, 16), 2: (3, 6, 8)}),
        (["--max-side", 32], {1: (10, 3, 4), 2: (10, 3, 4)}),       # 32x24 both
        (["--max-side", 100], {1: (10, 9, 12), 2: (10, 6, 8)}),     # 100x75 -> 96x72; 64x48 not upscaled
        (["--size", "40x40"], {1: (10, 5, 5), 2: (10, 5, 5)}),
        # 1 s at 5 frames/s: 5 frames, or 6 where videorate repeats the last frame at the end (as it does)
        (["--fps", 5], {1: ((5, 6), 12, 16), 2: ((5, 6), 6, 8)}),
    ]
    notes = []
    for opts, want in cases:
        out = os.path.join(d, "out" + "".join(str(o) for o in opts).replace("-", "_"))
        batch_ok(c, encode_args(manifest, model, out, *opts))
        x = by_line(results(out))
        for line, (frames, h, w) in want.items():
            got = read_header(x[line]["output"])[1] if os.path.exists(x[line]["output"]) else None
            if isinstance(frames, tuple) and got and got[0] in frames:
                frames = got[0]
            c.check(x[line]["status"] == "ok" and got == [frames, Z, h, w] and x[line]["frames"] == frames,
                    "%s line %d: %s, file %s; expected %s" % (" ".join(map(str, opts)), line, x[line], got,
                                                              [frames, Z, h, w]))
        notes.append(" ".join(map(str, opts)))
    # Options that change the numbers change the fingerprint: a rerun with another --max-frames re-encodes.
    out = os.path.join(d, "out__max_frames3")
    batch_ok(c, encode_args(manifest, model, out, "--max-frames", 4))
    x = by_line(results(out))
    c.check(x[1]["status"] == "ok" and x[1]["frames"] == 4, "--max-frames 3 -> 4: %s" % x[1])
    return ", ".join(notes)


def case_usage_errors(c, model, tmp):
    d = os.path.join(tmp, "e3")
    make_clip(os.path.join(d, "good.webm"), 5, 64, 48)
    bad = [
        ("{not json", "not valid JSON"),
        (json.dumps({"output": "x.latent"}), "input"),
        (json.dumps({"input": "good.webm", "start": 2, "end": 1}), "start"),
        (json.dumps({"input": "good.webm", "start": 1, "end": 1}), "start"),
    ]
    for text, needle in bad:
        manifest = write_manifest(os.path.join(d, "m.txt"), ["# header", "good.webm", "", text, "good.webm"])
        out = os.path.join(d, "out")
        r = batch(encode_args(manifest, model, out))
        c.check(r.rc == 2, "%r: exit %s, expected 2\n%s" % (text, r.rc, r.text(800)))
        c.check(re.search(r"\bline 4\b", r.err), "%r: the message does not name line 4:\n%s" % (text, r.err[-800:]))
        c.check(needle in r.err, "%r: the message does not mention %r:\n%s" % (text, needle, r.err[-800:]))
        c.check(not os.path.exists(out), "%r: a usage error created %s" % (text, out))
        r = batch(encode_args(manifest, model, out, "--dry-run"))
        c.check(r.rc == 2 and "line 4" in r.err, "%r with --dry-run: exit %s" % (text, r.rc))
    for args in (["--format", "png"], ["--max-side", 64, "--size", "64x64"], ["--shard", "1"], ["--bogus"]):
        r = batch(encode_args(os.path.join(d, "m.txt"), model, os.path.join(d, "out")) + args)
        c.check(r.rc == 2, "%s: exit %s, expected 2" % (args, r.rc))
    r = batch(encode_args(os.path.join(d, "nothere.txt"), model, os.path.join(d, "out")))
    c.check(r.rc == 2, "missing manifest: exit %s, expected 2" % r.rc)
    r = batch(encode_args(os.path.join(d, "m.txt"), os.path.join(d, "nomodel.safetensors"), os.path.join(d, "out")))
    c.check(r.rc == 2, "missing model: exit %s, expected 2" % r.rc)


def case_retry(c, model, tmp):
    c.need(E, "needs case e's run")
    d, manifest, out, first = E["d"], E["manifest"], E["out"], E["rows"]
    failed = {l for l, x in first.items() if x["status"] == "failed"}
    plan = {a["line"]: a["action"] for a in dry_run(c, manifest, model, out)}
    for l, a in plan.items():
        want = "skip" if l not in failed else ("failed-before" if l not in (7, 12) else None)
        if want:
            c.check(a == want, "dry run after failures, line %d: %r, expected %r" % (l, a, want))
    # Without --retry-failed: failed items stay failed ("failed before: ..."), the good ones are skipped.
    for attempt in (1, 2):
        batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4), rc=1, timeout=60)
        x = by_line(results(out))
        for l in first:
            if l in failed and l not in (7, 12):
                e = x[l].get("error", "")
                c.check(x[l]["status"] == "failed" and e.startswith("failed before: ")
                        and e.endswith("(use --retry-failed)") and first[l]["error"] in e,
                        "rerun %d, line %d: %s" % (attempt, l, x[l]))
                c.check(e.count("failed before") == 1, "rerun %d, line %d: the error nests: %r" % (attempt, l, e))
            elif l in failed:
                c.check(x[l]["status"] == "failed" and x[l]["error"] == first[l]["error"],
                        "rerun %d, line %d: %s" % (attempt, l, x[l]))
            else:
                c.check(x[l]["status"] == "skipped", "rerun %d, line %d: %s" % (attempt, l, x[l]))
    # Fix the missing file; --retry-failed encodes it and tries the others again with their real errors.
    make_clip(os.path.join(d, "missing.webm"), 4, 64, 48)
    batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4, "--retry-failed"), rc=1, timeout=60)
    x = by_line(results(out))
    c.check(x[2]["status"] == "ok" and x[2]["frames"] == 4, "--retry-failed, fixed line 2: %s" % x[2])
    for l in failed - {2}:
        c.check(x[l]["status"] == "failed" and not x[l]["error"].startswith("failed before"),
                "--retry-failed, line %d: %s" % (l, x[l]))
    # The item that succeeded last time must not inherit the failure of its duplicate line (same key).
    os.unlink(first[1]["output"])
    batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4), rc=1, timeout=60)
    x = by_line(results(out))
    c.check(x[1]["status"] == "ok", "line 1 (ok last time, output deleted; its duplicate line 7 failed): %s" % x[1])
    c.check(x[2]["status"] == "skipped", "line 2 after its successful retry: %s" % x[2])


# ------------------------------------------------------------------ f

def case_hostile(c, model, tmp):
    """Names and manifests a reviewer tried: '%' and ':' in file names, a
    non-UTF-8 name, two spellings of one output, outputs into the tool's own
    files or with another extension, and a run that cannot start."""
    d = os.path.join(tmp, "h")
    clip = make_clip(os.path.join(d, "src.webm"), 6, 64, 48)
    names = ["My%20Video.webm", "a%2db.webm", "cam7:front.webm", b"\xe9t\xe9.webm"]
    for n in names:
        dst = os.path.join(d.encode() if isinstance(n, bytes) else d, n)
        with open(clip, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
    with open(os.path.join(d, "m.txt"), "wb") as f:
        f.write(b"\xef\xbb\xbf" + json.dumps({"input": "src.webm", "output": "d.latent", "start": 0.1}).encode() + b"\n")
        f.write(json.dumps({"input": "src.webm", "output": ".//d.latent", "start": 0.2}).encode() + b"\n")
        for n in names:
            f.write((n if isinstance(n, bytes) else n.encode()) + b"\n")
    manifest = os.path.join(d, "m.txt")
    out = os.path.join(d, "out")
    batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4), rc=1)
    x = by_line(results(out))
    c.check(x[1]["status"] == "ok", "a JSON first line after a byte order mark: %s" % x.get(1))
    c.check(x[2]["status"] == "failed" and x[2]["error"] == "output collides with line 1",
            "'.//d.latent' is 'd.latent': %s" % x.get(2))
    for line in (3, 4, 5, 6):
        c.check(x[line]["status"] == "ok" and x[line]["frames"] == 6, "line %d: %s" % (line, x.get(line)))
    c.check(x[5]["key"].endswith("/cam7:front.webm"), "a ':' in a file name made a URI: %s" % x[5]["key"])
    c.check(not hidden_files(out), "hidden files left: %s" % hidden_files(out))
    rows_before = open(os.path.join(out, "_results", "shard-0-of-1.jsonl"), "rb").read()
    # The tool's own files and a wrong extension are refused as usage errors, naming the line.
    for output in ("_results/shard-0-of-1.jsonl", "x.npy", "../x.latent", ".hidden.latent"):
        bad = write_manifest(os.path.join(d, "bad.txt"), [json.dumps({"input": "src.webm", "output": output})])
        r = batch_ok(c, encode_args(bad, model, out), rc=2)
        c.check("manifest line 1" in r.err, "output %r: %s" % (output, r.err[-300:]))
    # A run that cannot start (no such device) exits 1 and leaves the last results alone.
    r = batch_ok(c, encode_args(manifest, model, out, "--device", "cuda:99"), rc=1)
    c.check(open(os.path.join(out, "_results", "shard-0-of-1.jsonl"), "rb").read() == rows_before,
            "a run that could not start replaced the results")
    return "%, ':', non-UTF-8 names encoded; './/d.latent' collides; bad outputs refused; results kept"


def summary(c, out, rc):
    r = batch(["--summary", out])
    c.need(r.rc == rc, "--summary %s: exit %s, expected %d\n%s" % (out, r.rc, rc, r.text()))
    s = json.loads(r.out.strip().splitlines()[-1])
    with open(os.path.join(out, "_results", "summary.json")) as f:
        c.check(json.load(f) == s, "summary.json differs from the printed summary")
    for k in ("shards", "items", "ok", "skipped", "failed", "frames", "missing_shards"):
        c.check(k in s, "summary lacks %r: %s" % (k, s))
    return s


def case_summary(c, model, tmp):
    manifest = os.path.join(tmp, "a", "manifest.txt")
    c.need(os.path.exists(manifest), "needs case a's manifest")
    out = os.path.join(tmp, "f", "out")
    n = 2
    for i in range(n):
        batch_ok(c, encode_args(manifest, model, out, "--shard", "%d/%d" % (i, n)))
    items = len(dry_run(c, manifest, model, out))
    s = summary(c, out, 0)
    c.check(s["shards"] == n and s["items"] == items and s["ok"] == items and s["failed"] == 0
            and s["missing_shards"] == [] and s["frames"] == 5 * items, "complete run: %s" % s)
    # A rerun of one shard: its items count as skipped.
    batch_ok(c, encode_args(manifest, model, out, "--shard", "1/%d" % n))
    s = summary(c, out, 0)
    n1 = len(results(out, 1, n))
    c.check(s["skipped"] == n1 and s["ok"] == items - n1 and s["frames"] == 5 * items, "after a rerun: %s" % s)
    # Missing shard.
    miss = os.path.join(tmp, "f", "missing")
    shutil.copytree(out, miss)
    os.unlink(os.path.join(miss, "_results", "shard-0-of-2.jsonl"))
    os.unlink(os.path.join(miss, "_results", "shard-0-of-2._SUCCESS"))
    s = summary(c, miss, 1)
    c.check(s["missing_shards"] == [0] and s["items"] == n1, "shard 0 missing: %s" % s)
    # The last shard missing (the count comes from the others' names).
    miss = os.path.join(tmp, "f", "missing-last")
    shutil.copytree(out, miss)
    for suffix in ("jsonl", "_SUCCESS"):
        os.unlink(os.path.join(miss, "_results", "shard-1-of-2." + suffix))
    s = summary(c, miss, 1)
    c.check(s["missing_shards"] == [1], "shard 1 missing: %s" % s)
    # A shard without _SUCCESS (e.g. killed before its end).
    nos = os.path.join(tmp, "f", "no-success")
    shutil.copytree(out, nos)
    os.unlink(os.path.join(nos, "_results", "shard-1-of-2._SUCCESS"))
    summary(c, nos, 1)
    # Failed rows (case e's out-dir).
    if E:
        s = summary(c, E["out"], 1)
        c.check(s["failed"] > 0, "case e's summary: %s" % s)
    return "complete -> 0; missing shard, missing _SUCCESS, failed rows -> 1"


# ------------------------------------------------------------------ g

def case_bench(c, model, tmp):
    n = int(os.environ.get("GSTVAE_BATCH_BENCH_ITEMS", "6"))
    d = os.path.join(tmp, "g")
    clips = [make_clip(os.path.join(d, "b%02d.webm" % i), 100, 64, 64, fps=25, pattern=i % 20) for i in range(n)]
    manifest = write_manifest(os.path.join(d, "m.txt"), [os.path.basename(p) for p in clips])
    out = os.path.join(d, "out")
    r = batch_ok(c, encode_args(manifest, model, out, "--per-batch", 16))
    loads = model_loads(c, r)
    c.check(loads == 1, "model loads: %d for %d items, expected 1" % (loads, n))
    rows = results(out)
    c.check(len(rows) == n and all(x["status"] == "ok" and x["frames"] == 100 for x in rows), "rows %s" % rows)
    encode_only = sum(x["seconds"] for x in rows)
    tool_total = r.seconds
    t0 = time.monotonic()
    for i, p in enumerate(clips):
        loc = os.path.join(d, "launch-%02d.latent" % i)
        q = subprocess.run(["gst-launch-1.0", "-q", "uridecodebin", "uri=file://" + p, "!", "videoconvert", "!",
                            "videoscale", "!", "video/x-raw,format=RGB", "!", "vaeencode", "model=" + model,
                            "per-batch=16", "!", "latentfilesink", "location=" + loc],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        c.check(q.returncode == 0, "gst-launch-1.0 for %s: exit %d\n%s" % (p, q.returncode, q.stdout[-800:]))
        if q.returncode == 0 and i == 0:
            c.check(np.array_equal(read_tensor(loc), read_tensor(rows[0]["output"])),
                    "gst-launch-1.0 and gst-vae-batch encode %s differently" % p)
    launch_total = time.monotonic() - t0
    # The fixed cost of a run (process start, plugin and LibTorch loading, model
    # hash and load): the same run over an empty manifest.
    empty = write_manifest(os.path.join(d, "empty.txt"), ["# nothing"])
    r0 = batch_ok(c, encode_args(empty, model, os.path.join(d, "out-empty"), "--per-batch", 16))
    per_item = (tool_total - r0.seconds - encode_only) / n
    # Two at a time: still one model.
    out2 = os.path.join(d, "out-jobs2")
    r2 = batch_ok(c, encode_args(manifest, model, out2, "--per-batch", 16, "--jobs", 2))
    c.check(model_loads(c, r2) == 1, "--jobs 2: model loads != 1")
    print("BENCH items=%d frames/item=100 size=64x64 per-batch=16 cpus=%d" % (n, os.cpu_count()))
    print("BENCH gst-vae-batch one process: %.2f s total, %.2f s in item pipelines, overhead %.3f s/item "
          "(%.1f%% of encode-only), model loads: %d" % (tool_total, encode_only, (tool_total - encode_only) / n,
                                                       100 * (tool_total - encode_only) / max(encode_only, 1e-9),
                                                       loads))
    print("BENCH fixed cost of a run (empty manifest, model load included): %.2f s; per-item overhead beyond "
          "the item's own pipeline, fixed cost excluded: %.3f s/item = %.1f%% of an item's %.2f s"
          % (r0.seconds, per_item, 100 * per_item / max(encode_only / n, 1e-9), encode_only / n))
    print("BENCH gst-launch-1.0 per item: %.2f s total, overhead %.3f s/item vs encode-only (%.1f%%)"
          % (launch_total, (launch_total - encode_only) / n, 100 * (launch_total - encode_only) /
             max(encode_only, 1e-9)))
    print("BENCH gst-vae-batch --jobs 2: %.2f s total" % r2.seconds)
    print("BENCH speed-up of the tool over per-item gst-launch-1.0: %.2fx" % (launch_total / max(tool_total, 1e-9)))
    sys.stdout.flush()
    return "tool %.1f s, per-item gst-launch %.1f s" % (tool_total, launch_total)


# ------------------------------------------------------------------ i

def case_one_runner(c, model, tmp):
    """Two runs of one shard at once (a resubmitted Slurm task while the first
    still runs): the second refuses, naming the lock and the other run; the
    first finishes alone, with a results file that parses."""
    d = os.path.join(tmp, "i1")
    make_clip(os.path.join(d, "long.webm"), 300, 128, 96, fps=30, pattern=18)
    make_clip(os.path.join(d, "short.webm"), 5, 64, 48)
    manifest = write_manifest(os.path.join(d, "m.txt"), ["long.webm", "short.webm"])
    out = os.path.join(d, "out")
    args = encode_args(manifest, model, out, "--per-batch", 4)
    with open(os.path.join(d, "first.log"), "wb") as log:
        first, _ = start_and_wait_staging(c, args, out, log)
        second = batch(args, timeout=60)
        try:
            rc = first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            rc = "hung"
    c.check(second.rc not in (0, 2) and isinstance(second.rc, int),
            "a second run of a running shard: exit %s, expected a refusal (non-zero, not a usage error)\n%s"
            % (second.rc, second.text(1500)))
    lock = os.path.join(out, "_results", "shard-0-of-1.lock")
    c.check(lock in second.err and "pid %d" % first.pid in second.err,
            "the refusal does not name the lock %s and the other run (pid %d):\n%s" % (lock, first.pid, second.err))
    c.check(rc == 0, "the first run: exit %s" % rc)
    with open(os.path.join(out, "_results", "shard-0-of-1.jsonl"), encoding="utf-8") as f:
        text = f.read()
    rows = []
    for l in text.splitlines():
        try:
            rows.append(json.loads(l))
        except ValueError:
            c.check(False, "a results line does not parse: %r" % l)
    c.check(sorted(x["line"] for x in rows) == [1, 2] and all(x["status"] == "ok" for x in rows),
            "results of the first run: %s" % rows)
    # The lock dies with its holder: a SIGKILLed run does not block the next one.
    shutil.rmtree(out)
    with open(os.path.join(d, "killed.log"), "wb") as log:
        p, _ = start_and_wait_staging(c, args, out, log)
        p.kill()
        p.wait()
    batch_ok(c, args, timeout=120)
    summary(c, out, 0)
    return "second run: exit %d, %s" % (second.rc, second.err.strip().splitlines()[0][:160])


def case_summary_corrupt(c, model, tmp):
    """A results file that does not parse (garbage, cut short, two rows spliced
    on one line) fails the summary, naming the file and the line."""
    d = os.path.join(tmp, "i2")
    make_clip(os.path.join(d, "a.webm"), 5, 64, 48)
    make_clip(os.path.join(d, "b.webm"), 5, 64, 48, pattern=1)
    manifest = write_manifest(os.path.join(d, "m.txt"), ["a.webm", "b.webm"])
    good = os.path.join(d, "good")
    batch_ok(c, encode_args(manifest, model, good))
    summary(c, good, 0)
    with open(os.path.join(good, "_results", "shard-0-of-1.jsonl"), "rb") as f:
        blob = f.read()
    rows = blob.splitlines(keepends=True)
    c.need(len(rows) == 2, "two rows expected: %r" % blob)
    variants = {
        "garbage": (blob + b"#!garbage\x00\xff\n", 3),
        "cut": (blob[:100], 1),
        "spliced": (rows[0].rstrip(b"\n") + rows[1], 1),
    }
    notes = []
    for name, (content, line) in variants.items():
        out = os.path.join(d, name)
        shutil.copytree(good, out)
        path = os.path.join(out, "_results", "shard-0-of-1.jsonl")
        with open(path, "wb") as f:
            f.write(content)
        r = batch(["--summary", out])
        c.check(r.rc == 1, "%s results file: --summary exit %s, expected 1\n%s" % (name, r.rc, r.text()))
        c.check(path in r.err and re.search(r"\bline %d\b" % line, r.err),
                "%s: the message does not name %s line %d:\n%s" % (name, path, line, r.err[-800:]))
        notes.append(name)
    return ", ".join(notes) + ": exit 1 naming file and line"


def case_manifest_folder(c, model, tmp):
    """--manifest naming a folder is a usage error, like a missing manifest."""
    d = os.path.join(tmp, "i3")
    os.makedirs(os.path.join(d, "manifests"), exist_ok=True)
    out = os.path.join(d, "out")
    for args in (encode_args(os.path.join(d, "manifests"), model, out),
                 encode_args(os.path.join(d, "manifests"), model, out, "--dry-run")):
        r = batch(args)
        c.check(r.rc == 2 and "manifest" in r.err and "folder" in r.err,
                "%s: exit %s, expected 2 naming the manifest as a folder\n%s" % (args[-1], r.rc, r.text(800)))
    c.check(not os.path.exists(out), "a manifest folder created %s" % out)


class Mount:
    """A tmpfs of `size` at `path` (root only), unmounted at the end."""

    def __init__(self, path, size):
        self.path, self.size = path, size

    def __enter__(self):
        os.makedirs(self.path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % self.size, "tmpfs", self.path], check=True)
        return self

    def remount(self, opts):
        subprocess.run(["mount", "-o", "remount," + opts, self.path], check=True)

    def __exit__(self, *exc):
        subprocess.run(["umount", "-l", self.path])


def case_environment_failures(c, model, tmp):
    """A full disk or a read-only output folder is not the item's fault: the
    run stops (exit 1, naming the cause), writes no failed row, and a plain
    rerun after the fix encodes the items."""
    d = os.path.join(tmp, "i4")
    probe = os.path.join(d, "mount-probe")
    os.makedirs(probe)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe],
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT).returncode != 0:
        return "not run: mounting a tmpfs needs root (or CAP_SYS_ADMIN) here"
    subprocess.run(["umount", probe], check=True)
    # 20 latents of 4x16x16 float32: 80 KiB, more than the 64 KiB out-dir holds.
    make_clip(os.path.join(d, "big.webm"), 20, 128, 128)
    make_clip(os.path.join(d, "small.webm"), 5, 64, 48)
    manifest = write_manifest(os.path.join(d, "m.txt"), ["big.webm", "small.webm"])
    out = os.path.join(d, "full")
    args = encode_args(manifest, model, out, "--per-batch", 4)
    notes = []
    with Mount(out, "64k") as disk:
        r = batch(args, timeout=120)
        c.check(r.rc == 1, "a full disk: exit %s, expected 1\n%s" % (r.rc, r.text()))
        c.check(os.strerror(errno.ENOSPC) in r.err and "stopped" in r.err,
                "a full disk: the message does not say the run stopped for it:\n%s" % r.err[-1500:])
        rows = results(out) if os.path.exists(os.path.join(out, "_results", "shard-0-of-1.jsonl")) else []
        c.check(not [x for x in rows if x["status"] == "failed"], "a full disk made failed rows: %s" % rows)
        c.check(not os.path.exists(success_marker(out)), "_SUCCESS after a full disk")
        c.check(not hidden_files(out), "a full disk left hidden files: %s" % hidden_files(out))
        notes.append(r.err.strip().splitlines()[-2][:200] if r.err.strip() else "")
        disk.remount("size=8m")
        r = batch_ok(c, args, timeout=120)
        x = by_line(results(out))
        c.check(x.get(1, {}).get("status") == "ok" and x.get(2, {}).get("status") == "ok",
                "the rerun after freeing space: %s" % x)
    # A read-only output folder (EROFS) for an item's "output".
    d2 = os.path.join(d, "ro-case")
    manifest2 = write_manifest(os.path.join(d, "m2.txt"),
                               [json.dumps({"input": "small.webm", "output": "ro/small.latent"}), "big.webm"])
    out2 = os.path.join(d2, "out")
    os.makedirs(out2)
    args2 = encode_args(manifest2, model, out2, "--per-batch", 4)
    with Mount(os.path.join(out2, "ro"), "1m") as ro:
        ro.remount("ro")
        r = batch(args2, timeout=120)
        c.check(r.rc == 1 and os.strerror(errno.EROFS) in r.err,
                "a read-only output folder: exit %s, expected 1 naming EROFS\n%s" % (r.rc, r.text()))
        rows = results(out2) if os.path.exists(os.path.join(out2, "_results", "shard-0-of-1.jsonl")) else []
        c.check(not [x for x in rows if x["status"] == "failed"], "a read-only folder made failed rows: %s" % rows)
        ro.remount("rw")
        batch_ok(c, args2, timeout=120)
        x = by_line(results(out2))
        c.check(x.get(1, {}).get("status") == "ok", "the rerun after making the folder writable: %s" % x)
        notes.append("EROFS")
    return "; ".join(notes)


def video_model(c, tmp, family):
    """A small random TAEHV (taew2_1, width 16) or Wan 2.1 (dim 8) checkpoint."""
    path = os.path.join(tmp, "video-%s.safetensors" % family)
    if not os.path.exists(path):
        if family == "taehv":
            cmd = [sys.executable, os.path.join(HERE, "taehv_reference.py"), "make-weights", "--variant", "taew2_1",
                   "--width", "16", "--out", path, "--seed", "1"]
        else:
            cmd = [sys.executable, os.path.join(HERE, "wan_weights.py"), "--variant", "2.1", "--dim", "8",
                   "--out", path]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        c.need(p.returncode == 0, "%s exited %d:\n%s" % (cmd, p.returncode, p.stdout.decode()[-2000:]))
    return path


def case_video_counts(c, model, tmp):
    """Video VAEs: rows count input frames, latents and dropped frames apart;
    a clip too short for a latent and a range past the clip's end say so."""
    d = os.path.join(tmp, "i5")
    make_clip(os.path.join(d, "one.webm"), 1, 64, 64)
    make_clip(os.path.join(d, "ten.webm"), 10, 64, 64, pattern=1)
    manifest = write_manifest(os.path.join(d, "m.txt"), [
        "one.webm",                                                       # 1
        "ten.webm",                                                       # 2
        json.dumps({"input": "ten.webm", "start": 5}),                    # 3: the clip is 1 s long
    ])
    vague = "no video frames decoded"
    taehv = video_model(c, tmp, "taehv")
    out = os.path.join(d, "taehv")
    batch_ok(c, encode_args(manifest, taehv, out, "--per-batch", 4), rc=1, timeout=300)
    x = by_line(results(out))
    e1, e3 = x[1].get("error", ""), x[3].get("error", "")
    c.check(x[1]["status"] == "failed" and vague not in e1 and "1 frame" in e1 and "4" in e1,
            "TAEHV, 1 frame: %s; expected an error saying 1 frame is too few for a latent of 4" % x[1])
    c.check(x[3]["status"] == "failed" and vague not in e3 and "start" in e3,
            "TAEHV, start past the end: %s; expected an error naming the range" % x[3])
    # TAEHV: latents of frames 0-3, 4-7; frames 8 and 9 are dropped.
    want = {"frames": 10, "latents": 2, "dropped_frames": 2}
    c.check(x[2]["status"] == "ok" and all(x[2].get(k) == v for k, v in want.items()),
            "TAEHV, 10 frames: %s; expected %s" % (x[2], want))
    c.check(read_header(x[2]["output"])[1][0] == 2, "TAEHV: the file holds %s" % read_header(x[2]["output"])[1])
    batch_ok(c, encode_args(manifest, taehv, out, "--per-batch", 4), rc=1, timeout=300)
    y = by_line(results(out))
    c.check(y[2]["status"] == "skipped" and all(y[2].get(k) == v for k, v in want.items()),
            "TAEHV, 10 frames, skipped on a rerun: %s; expected %s" % (y[2], want))
    out = os.path.join(d, "taehv-max")
    batch_ok(c, encode_args(manifest, taehv, out, "--per-batch", 4, "--max-frames", 6), rc=1, timeout=300)
    x = by_line(results(out))
    want = {"frames": 6, "latents": 1, "dropped_frames": 2}
    c.check(x[2]["status"] == "ok" and all(x[2].get(k) == v for k, v in want.items()),
            "TAEHV --max-frames 6: %s; expected %s" % (x[2], want))
    # Wan: latent 0 is frame 0, then 1-4, 5-8; frame 9 is dropped.
    wan = video_model(c, tmp, "wan")
    out = os.path.join(d, "wan")
    batch_ok(c, encode_args(manifest, wan, out, "--per-batch", 4), rc=1, timeout=300)
    x = by_line(results(out))
    for line, want in ((1, {"frames": 1, "latents": 1, "dropped_frames": 0}),
                       (2, {"frames": 10, "latents": 3, "dropped_frames": 1})):
        c.check(x[line]["status"] == "ok" and all(x[line].get(k) == v for k, v in want.items()),
                "Wan, line %d: %s; expected %s" % (line, x[line], want))
    # An image VAE: one latent per frame.
    out = os.path.join(d, "image")
    batch_ok(c, encode_args(manifest, model, out, "--per-batch", 4), rc=1)
    x = by_line(results(out))
    want = {"frames": 10, "latents": 10, "dropped_frames": 0}
    c.check(x[2]["status"] == "ok" and all(x[2].get(k) == v for k, v in want.items()),
            "image VAE, 10 frames: %s; expected %s" % (x[2], want))
    s = summary(c, out, 1)
    c.check(s.get("frames") == 11 and s.get("latents") == 11, "image VAE summary: %s" % s)
    r = batch(encode_args(manifest, model, os.path.join(d, "foo"), "--device", "foo"))
    c.check(r.rc == 2 and "--device" in r.err, "--device foo: exit %s, expected 2\n%s" % (r.rc, r.text(800)))
    return "TAEHV 1 frame: %s; start past the end: %s" % (e1[:100], e3[:100])


def case_small_manifest_rules(c, model, tmp):
    """Dot-file inputs get visible outputs; a NUL byte or an unknown JSON key
    is a usage error naming the line; gst-vae-latent-info --help."""
    d = os.path.join(tmp, "i6")
    make_clip(os.path.join(d, ".dot.webm"), 4, 64, 48)
    make_clip(os.path.join(d, "good.webm"), 4, 64, 48, pattern=1)
    out = os.path.join(d, "out")
    manifest = write_manifest(os.path.join(d, "m.txt"), [".dot.webm", "good.webm"])
    batch_ok(c, encode_args(manifest, model, out))
    x = by_line(results(out))
    name = os.path.basename(x[1]["output"])
    c.check(x[1]["status"] == "ok" and not name.startswith(".") and name.startswith("dot-"),
            "a dot-file's output: %s" % x[1])
    c.check(not hidden_files(out), "hidden files in the out-dir: %s" % hidden_files(out))
    batch_ok(c, encode_args(manifest, model, out))
    c.check(by_line(results(out))[1]["status"] == "skipped", "a dot-file's output is not skipped on a rerun")
    bad = os.path.join(d, "bad.txt")
    for content, needle in ((b"good.webm\n.dot.webm\x00junk\n", "NUL"),
                            (b'good.webm\n{"input": "good.webm", "ouptut": "y.latent"}\n', "ouptut")):
        with open(bad, "wb") as f:
            f.write(content)
        for extra in ([], ["--dry-run"]):
            r = batch(encode_args(bad, model, os.path.join(d, "out-bad"), *extra))
            c.check(r.rc == 2 and re.search(r"\bline 2\b", r.err) and needle in r.err,
                    "%r %s: exit %s, expected 2 naming line 2 and %r\n%s" % (content, extra, r.rc, needle,
                                                                             r.text(800)))
    c.check(not os.path.exists(os.path.join(d, "out-bad")), "a refused manifest created the out-dir")
    info = os.path.join(os.path.dirname(tool_path()), "gst-vae-latent-info")
    for flag in ("--help", "-h"):
        p = subprocess.run([info, flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        c.check(p.returncode == 0 and b"usage" in p.stdout and b"cannot" not in p.stderr,
                "gst-vae-latent-info %s: exit %d\n%s%s" % (flag, p.returncode, p.stdout[-300:], p.stderr[-300:]))


# ------------------------------------------------------------------ main

def main():
    sys.path.insert(0, HERE)
    import vae_reference as V

    tool = tool_path()
    if not os.access(tool, os.X_OK):
        print("FAIL gst-vae-batch not found at %s (set GSTVAE_BATCH_TOOL)" % tool)
        sys.exit(1)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gstvae-batch-") as tmp:
        model = os.path.join(tmp, MODEL_NAME)
        V.make_checkpoint(model, layout="ldm", ch=32, mult=(1, 2, 2, 2), blocks=1, z=Z, seed=11)
        cases = [
            ("a. shards: disjoint, complete, same by all four ways; one encode each; appending moves nothing",
             case_shards),
            ("b. outputs: frames, sizes, names, metadata, npy sidecar, safetensors, rows, _SUCCESS", case_outputs),
            ("c. rerun skips untouched; latent-format, truncated, deleted, sidecar re-encode", case_rerun),
            ("d. SIGKILL mid-item: nothing under the final name; rerun completes", case_kill),
            ("d. SIGTERM mid-item: exit 1 promptly, interrupted row, no _SUCCESS; rerun completes", case_term),
            ("d. a zombie's staging files are removed, a live run's kept", case_zombie_leftovers),
            ("e. bad items are failed rows, good items (odd names, ranges) succeed", case_bad_items),
            ("e. --max-frames, --max-side, --size, --fps", case_options),
            ("e. malformed manifest lines and options: exit 2 naming the line", case_usage_errors),
            ("e. --retry-failed", case_retry),
            ("f. --summary", case_summary),
            ("h. hostile names, outputs and a run that cannot start", case_hostile),
            ("i1. one runner per shard: a second run of a running shard refuses (lock)", case_one_runner),
            ("i2. --summary of a results file that does not parse fails naming file and line",
             case_summary_corrupt),
            ("i3. --manifest naming a folder: usage error", case_manifest_folder),
            ("i4. full disk, read-only out-dir: the run stops, items stay pending", case_environment_failures),
            ("i5. video VAEs: input frames, latents and dropped frames; causes named; --device",
             case_video_counts),
            ("i6. dot-file outputs visible; NUL bytes and unknown keys refused; latent-info --help",
             case_small_manifest_rules),
            ("g. benchmark vs gst-launch-1.0 per item; model loads: 1", case_bench),
        ]
        run_selected(cases, (model, tmp), "GSTVAE_BATCH_CASES")
    finish(t0)


if __name__ == "__main__":
    main()
