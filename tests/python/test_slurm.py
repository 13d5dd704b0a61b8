#!/usr/bin/env python3
"""gst-vae-batch under a real (single-node) Slurm: a job array of 3 shards over a manifest.

Starts Slurm with scripts/slurm-local.sh (its own folder and ports; stopped at the end, whatever
happens), generates real VP8/WebM clips with gst-launch-1.0, a tiny random VAE checkpoint and a
manifest, then submits `sbatch --array=0-2 --wait` running

    gst-vae-batch --manifest M --model X --out-dir D --per-batch 4

(the shard is taken from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT), and checks the contract of
gst-vae-batch (the spec's "Results", "Output path", "Output metadata", "--summary"):

  a. every good item is encoded exactly once over the 3 shards, each in shard fnv1a64(key) % 3;
     rows are complete; outputs load (safetensors header: latent_tensor [frames, 4, h/8, w/8],
     batch_key and batch_fingerprint); the corrupt item is a failed row with an error; the
     _SUCCESS markers exist for every shard but the corrupt item's; the exit codes agree;
     each task loaded the model once; `gst-vae-batch --summary D` agrees with the rows
  b. a second submission skips every good item (outputs untouched) and repeats the failure

Every case prints one PASS or FAIL line; the script exits non-zero if any failed. If Slurm cannot
be started the test FAILS (it does not skip).

Environment: GSTVAE_BATCH_TOOL (build/tools/gst-vae-batch), GST_PLUGIN_PATH (the built plugin),
GST_REGISTRY (optional). Slurm: `bash scripts/setup.sh slurm` installs it. GSTVAE_SLURM_KEEP=1
keeps the temporary folder (its path is printed).
"""
import glob
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SLURM_LOCAL = os.path.join(ROOT, "scripts", "slurm-local.sh")
SHARDS = 3
PER_BATCH = 4
Z = 4  # latent channels of the test model
DOWN = 8  # spatial factor of the test model (mult has 4 levels: 3 downsamplings)
SBATCH_TIMEOUT = 900

# (folder, file name, videotestsrc pattern, width, height, frames, fps)
CLIPS = [
    ("a", "clip.webm", "smpte", 64, 48, 12, 30),
    ("b", "clip.webm", "ball", 96, 64, 5, 10),  # same file name as a/clip.webm
    ("c", "snow.webm", "snow", 128, 96, 30, 25),
    ("c", "circular.webm", "circular", 64, 48, 20, 15),
    ("d", "gradient.webm", "gradient", 96, 64, 8, 20),
    ("d", "zone.webm", "zone-plate", 128, 96, 17, 30),
    ("e", "pinwheel.webm", "pinwheel", 64, 48, 9, 12),
]
CORRUPT = ("bad", "broken.webm")
CUSTOM_OUTPUT = "custom/pinwheel-out.latent"  # the JSON manifest line for e/pinwheel.webm names its output

from casekit import FAILED, RAN, Case, CheckFailed, run_case  # noqa: F401 -- shared runner


# ------------------------------------------------------------------ helpers

def fnv1a64(text):
    h = 0xcbf29ce484222325
    for b in text.encode("utf-8"):
        h ^= b
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def free_port_pair():
    """A port p with p and p+1 free on 127.0.0.1 (slurmctld, slurmd), outside the default 6817/6818."""
    for _ in range(200):
        p = random.randint(20000, 60000)
        ok = True
        for port in (p, p + 1):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return p
    raise RuntimeError("no free port pair found")


def read_safetensors_header(path):
    """(header without __metadata__, metadata, data length) of a .latent/.safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError("%s: %d bytes, no header" % (path, len(blob)))
    (n,) = struct.unpack_from("<Q", blob, 0)
    if 8 + n > len(blob):
        raise ValueError("%s: header length %d past the end of the file (%d bytes)" % (path, n, len(blob)))
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    data_len = len(blob) - 8 - n
    for name, info in header.items():
        a, b = info["data_offsets"]
        if not (0 <= a <= b <= data_len):
            raise ValueError("%s: tensor %s has offsets %r past the data (%d bytes)" % (path, name, (a, b), data_len))
    return header, meta, data_len


def decoded_frames(path):
    """Frames a decodebin pipeline gets out of a clip (PyGObject), or raises."""
    import gi
    gi.require_version("Gst", "1.0")
    from gi.repository import Gst
    Gst.init(None)
    pipe = Gst.parse_launch("filesrc name=src ! decodebin ! videoconvert ! fakesink name=sink signal-handoffs=true")
    pipe.get_by_name("src").set_property("location", path)
    count = [0]
    pipe.get_by_name("sink").connect("handoff", lambda *a: count.__setitem__(0, count[0] + 1))
    pipe.set_state(Gst.State.PLAYING)
    msg = pipe.get_bus().timed_pop_filtered(60 * Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
    pipe.set_state(Gst.State.NULL)
    if msg is None:
        raise RuntimeError("%s: no EOS in 60 s" % path)
    if msg.type == Gst.MessageType.ERROR:
        raise RuntimeError("%s: %s" % (path, msg.parse_error()[0].message))
    return count[0]


def tail(text, chars=3000):
    return text[-chars:]


# ------------------------------------------------------------------ the data set

def make_dataset(c, tmp):
    """Clips, the corrupt file, the model and the manifest. Returns a dict describing them."""
    sys.path.insert(0, HERE)
    import vae_reference as V

    data = os.path.join(tmp, "data")
    items = []  # every manifest item, in manifest order: dict(input, key, frames, w, h, good, output)
    for folder, name, pattern, w, h, frames, fps in CLIPS:
        d = os.path.join(data, folder)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, name)
        cmd = ["gst-launch-1.0", "-q", "videotestsrc", "pattern=%s" % pattern, "num-buffers=%d" % frames, "!",
               "video/x-raw,width=%d,height=%d,framerate=%d/1" % (w, h, fps), "!", "videoconvert", "!",
               "vp8enc", "deadline=1", "!", "webmmux", "!", "filesink", "location=%s" % path]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        c.need(p.returncode == 0 and os.path.getsize(path) > 0,
               "generating %s failed (%d): %s" % (path, p.returncode, tail(p.stdout.decode("utf-8", "replace"))))
        n = decoded_frames(path)
        c.need(n == frames, "%s decodes to %d frames, expected %d" % (path, n, frames))
        items.append(dict(input=path, key=path, frames=frames, w=w, h=h, good=True, name=name))

    bad_dir = os.path.join(data, CORRUPT[0])
    os.makedirs(bad_dir, exist_ok=True)
    bad = os.path.join(bad_dir, CORRUPT[1])
    rnd = random.Random(1234)
    with open(bad, "wb") as f:
        f.write(bytes(rnd.getrandbits(8) for _ in range(4096)))
    items.append(dict(input=bad, key=bad, frames=0, w=0, h=0, good=False, name=CORRUPT[1]))

    model = os.path.join(tmp, "tiny-vae-test.safetensors")
    V.make_checkpoint(model, layout="ldm", ch=32, mult=(1, 2, 2, 2), blocks=1, z=Z, seed=11)

    # The manifest mixes the forms of the spec: relative paths (to the manifest's folder),
    # an absolute path, a JSON object with an output name, comments and blank lines.
    manifest = os.path.join(data, "manifest.txt")
    lines = ["# gst-vae-batch test manifest", ""]
    for i, it in enumerate(items):
        rel = os.path.relpath(it["input"], data)
        if it["name"] == "pinwheel.webm":
            lines.append(json.dumps({"input": rel, "output": CUSTOM_OUTPUT}))
        elif i == 2:
            lines.append(it["input"])  # absolute
        elif i == 3:
            lines.append("   # an indented comment")
            lines.append(rel)
        else:
            lines.append(rel)
        it["line"] = len(lines)
    lines.append("")
    with open(manifest, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return dict(items=items, model=model, manifest=manifest, data=data)


def expected_output(out_dir, it):
    if it["name"] == "pinwheel.webm":
        return os.path.join(out_dir, CUSTOM_OUTPUT)
    stem = os.path.splitext(os.path.basename(it["input"]))[0]
    return os.path.join(out_dir, "%s-%016x.latent" % (stem, fnv1a64(it["key"])))


# ------------------------------------------------------------------ Slurm

class Slurm:
    def __init__(self, tmp):
        self.dir = os.path.join(tmp, "slurm")
        self.env = dict(os.environ)
        self.env["SLURM_LOCAL_DIR"] = self.dir
        self.env["SLURM_LOCAL_PORT"] = str(free_port_pair())
        self.env["SLURM_CONF"] = os.path.join(self.dir, "slurm.conf")
        self.started = False

    def start(self):
        p = subprocess.run(["bash", SLURM_LOCAL, "start"], env=self.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=180)
        out = p.stdout.decode("utf-8", "replace")
        self.started = True  # stop even after a failed start (it cleans up half-started daemons)
        return p.returncode, out

    def stop(self):
        p = subprocess.run(["bash", SLURM_LOCAL, "stop"], env=self.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=180)
        return p.returncode, p.stdout.decode("utf-8", "replace")

    def run(self, args, timeout=60):
        p = subprocess.run(args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        return p.returncode, p.stdout.decode("utf-8", "replace")

    def sbatch_wait(self, args, timeout=SBATCH_TIMEOUT):
        """sbatch --wait ARGS; on a timeout the job is cancelled. Returns (exit status, output, job id)."""
        proc = subprocess.Popen(["sbatch", "--parsable", "--wait"] + args, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.run(["scancel", "--user", str(os.getuid())])
            proc.kill()
            out, _ = proc.communicate()
            text = out.decode("utf-8", "replace")
            raise RuntimeError("sbatch --wait did not finish in %d s (jobs cancelled):\n%s\nsqueue:\n%s"
                               % (timeout, tail(text), self.run(["squeue"])[1]))
        text = out.decode("utf-8", "replace")
        m = re.search(r"^(\d+)", text.strip())
        return proc.returncode, text, (m.group(1) if m else None)


JOB_SCRIPT = """#!/bin/bash
# gst-vae-batch, one shard per array task (the shard comes from SLURM_ARRAY_TASK_ID/COUNT).
"$GSTVAE_BATCH_TOOL" --manifest "$1" --model "$2" --out-dir "$3" --per-batch %d
rc=$?
echo "$rc" > "$4/exit-${SLURM_ARRAY_TASK_ID}"
exit "$rc"
""" % PER_BATCH


def submit(c, slurm, ds, tmp, out_dir, run_name):
    """One sbatch --array=0-2 --wait; returns {task: (exit code, log text)}."""
    script = os.path.join(tmp, "job.sh")
    with open(script, "w") as f:
        f.write(JOB_SCRIPT)
    os.chmod(script, 0o755)
    run_dir = os.path.join(tmp, run_name)
    os.makedirs(run_dir, exist_ok=True)
    rc, out, job = slurm.sbatch_wait([
        "--array=0-%d" % (SHARDS - 1), "--job-name=gstvae-%s" % run_name, "--export=ALL",
        "--chdir=%s" % tmp, "--output=%s/slurm-%%A_%%a.out" % run_dir, "--ntasks=1", "--cpus-per-task=1",
        script, ds["manifest"], ds["model"], out_dir, run_dir])
    tasks = {}
    for i in range(SHARDS):
        code_file = os.path.join(run_dir, "exit-%d" % i)
        logs = glob.glob(os.path.join(run_dir, "slurm-*_%d.out" % i))
        log = open(logs[0], encoding="utf-8", errors="replace").read() if logs else "(no log)"
        code = int(open(code_file).read().strip()) if os.path.exists(code_file) else None
        tasks[i] = (code, log)
    c.need(all(code is not None for code, _ in tasks.values()),
           "sbatch exited %d (job %s) and not every task ran to its end:\n%s\n%s"
           % (rc, job, tail(out), "\n".join("task %d:\n%s" % (i, tail(l, 1500)) for i, (_, l) in tasks.items())))
    return rc, tasks


def read_results(c, out_dir):
    """{shard: [rows]} from DIR/_results/shard-I-of-3.jsonl."""
    res = {}
    for i in range(SHARDS):
        path = os.path.join(out_dir, "_results", "shard-%d-of-%d.jsonl" % (i, SHARDS))
        c.need(os.path.isfile(path), "missing %s (have: %s)" % (path, sorted(os.listdir(os.path.join(out_dir, "_results")))
                                                                  if os.path.isdir(os.path.join(out_dir, "_results")) else "no _results"))
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    c.need(False, "%s:%d is not JSON (%s): %r" % (path, n, e, line))
        res[i] = rows
    return res


ROW_TYPES = {"line": int, "input": str, "key": str, "output": str, "status": str, "frames": int,
             "seconds": (int, float), "fps": (int, float)}


def check_row_fields(c, shard, row):
    where = "shard %d row %s" % (shard, json.dumps(row))
    for k, t in ROW_TYPES.items():
        if not c.check(k in row, "%s: no \"%s\"" % (where, k)):
            continue
        c.check(isinstance(row[k], t) and not isinstance(row[k], bool), "%s: \"%s\" is %r" % (where, k, row[k]))
    c.check("shape" in row, "%s: no \"shape\"" % where)
    c.check(row.get("status") in ("ok", "skipped", "failed"), "%s: status %r" % (where, row.get("status")))
    if row.get("status") == "failed":
        c.check(isinstance(row.get("error"), str) and row["error"].strip(), "%s: failed without an error" % where)
    else:
        c.check("error" not in row, "%s: \"error\" in a row that did not fail" % where)


def summary(c, out_dir):
    tool = os.environ["GSTVAE_BATCH_TOOL"]
    p = subprocess.run([tool, "--summary", out_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    out = p.stdout.decode("utf-8", "replace")
    objs = [l for l in out.splitlines() if l.strip().startswith("{")]
    c.need(len(objs) == 1, "--summary printed %d JSON lines (exit %d):\n%s\nstderr:\n%s"
           % (len(objs), p.returncode, out, tail(p.stderr.decode("utf-8", "replace"))))
    s = json.loads(objs[0])
    path = os.path.join(out_dir, "_results", "summary.json")
    c.check(os.path.isfile(path), "--summary did not write %s" % path)
    if os.path.isfile(path):
        with open(path) as f:
            c.check(json.load(f) == s, "summary.json differs from what --summary printed:\n%s\n%s"
                    % (open(path).read(), objs[0]))
    return p.returncode, s


# ------------------------------------------------------------------ cases

def case_first_run(c, slurm, ds, tmp, out_dir, state):
    rc, tasks = submit(c, slurm, ds, tmp, out_dir, "run1")
    items = ds["items"]
    shard_of = {it["key"]: fnv1a64(it["key"]) % SHARDS for it in items}
    bad = [it for it in items if not it["good"]][0]
    res = read_results(c, out_dir)
    # The shard that holds the corrupt item: by the spec fnv1a64(key) % 3 (checked below, per item); the
    # exit codes and _SUCCESS markers are checked against the shard whose results hold it, so that one
    # wrong hash does not fail every later check too.
    bad_shard = shard_of[bad["key"]]
    for i, rows in res.items():
        if any(r.get("key") == bad["key"] for r in rows):
            bad_shard = i
    state["bad_shard"] = bad_shard
    logs = "\n".join("task %d (exit %s):\n%s" % (i, code, tail(log, 1500)) for i, (code, log) in tasks.items())

    # Exit codes: 1 for the corrupt item's shard, 0 for the others; sbatch --wait reports the highest.
    for i, (code, log) in tasks.items():
        c.check(code == (1 if i == bad_shard else 0), "task %d exited %s, expected %d:\n%s"
                % (i, code, 1 if i == bad_shard else 0, tail(log, 1500)))
        lines = [l for l in log.splitlines() if l.strip()]
        c.check(lines and "model loads: 1" in lines[-1],
                "task %d: the last stderr line does not report \"model loads: 1\": %r" % (i, lines[-1:] or ""))
    c.check(rc != 0, "sbatch --wait exited 0 although task %d failed" % bad_shard)

    # Every item exactly once, in its shard, with a complete row.
    seen = {}
    for i, rows in res.items():
        for row in rows:
            check_row_fields(c, i, row)
            seen.setdefault(row.get("key"), []).append(i)
    for it in items:
        c.check(seen.get(it["key"]) == [shard_of[it["key"]]],
                "%s (line %d, fnv1a64 %% 3 = %d) appears in shards %s" % (it["key"], it["line"], shard_of[it["key"]],
                                                                     seen.get(it["key"])))
    extra = set(seen) - {it["key"] for it in items}
    c.check(not extra, "rows for keys not in the manifest: %s" % sorted(map(str, extra)))

    rows = {row.get("key"): row for rows in res.values() for row in rows}
    outputs = set()
    frames_total = sum(it["frames"] for it in items if it["good"])
    for it in items:
        row = rows.get(it["key"])
        if row is None:
            continue
        c.check(row.get("line") == it["line"], "%s: line %r, expected %d" % (it["key"], row.get("line"), it["line"]))
        c.check(row.get("input") in (it["input"], os.path.relpath(it["input"], ds["data"])),
                "%s: input %r" % (it["key"], row.get("input")))
        if not it["good"]:
            c.check(row.get("status") == "failed", "corrupt %s: status %r" % (it["key"], row.get("status")))
            c.check(row.get("shape") is None, "corrupt %s: shape %r" % (it["key"], row.get("shape")))
            c.check(not os.path.exists(expected_output(out_dir, it)), "corrupt %s left an output" % it["key"])
            state["bad_error"] = row.get("error")
            continue
        c.check(row.get("status") == "ok", "%s: status %r, error %r" % (it["key"], row.get("status"), row.get("error")))
        c.check(row.get("frames") == it["frames"], "%s: frames %r, expected %d" % (it["key"], row.get("frames"),
                                                                                  it["frames"]))
        shape = [Z, it["h"] // DOWN, it["w"] // DOWN]
        c.check(row.get("shape") == shape, "%s: shape %r, expected %r" % (it["key"], row.get("shape"), shape))
        want = expected_output(out_dir, it)
        got = os.path.join(out_dir, row.get("output") or "")
        c.check(os.path.normpath(got) == os.path.normpath(want), "%s: output %r, expected %s" % (it["key"],
                                                                                                row.get("output"), want))
        want = os.path.normpath(got)  # go on with the file the tool wrote
        outputs.add(want)
        if not c.check(os.path.isfile(want), "%s: no output file %s" % (it["key"], want)):
            continue
        try:
            header, meta, _ = read_safetensors_header(want)
        except Exception as e:  # noqa: BLE001
            c.check(False, "%s: unreadable: %s" % (want, e))
            continue
        lt = header.get("latent_tensor")
        c.check(lt is not None and lt.get("shape") == [it["frames"]] + shape,
                "%s: latent_tensor %r, expected shape %r" % (want, lt, [it["frames"]] + shape))
        c.check(meta.get("batch_key") == it["key"], "%s: batch_key %r" % (want, meta.get("batch_key")))
        c.check(re.fullmatch(r"[0-9a-f]{16}", str(meta.get("batch_fingerprint", ""))),
                "%s: batch_fingerprint %r" % (want, meta.get("batch_fingerprint")))
        state.setdefault("mtimes", {})[want] = os.stat(want).st_mtime_ns
        state.setdefault("fingerprints", {})[want] = meta.get("batch_fingerprint")
    c.check(len(outputs) == sum(1 for it in items if it["good"]), "outputs collide: %s" % sorted(outputs))
    a, b = [os.path.join(out_dir, rows.get(it["key"], {}).get("output") or "?")
            for it in items if it["name"] == "clip.webm"]
    c.check(a != b and os.path.isfile(a) and os.path.isfile(b), "a/clip.webm and b/clip.webm: %s, %s" % (a, b))

    # No temporary files left under the out-dir (all outputs renamed into place).
    leftovers = [os.path.join(r, f) for r, _, fs in os.walk(out_dir) for f in fs
                 if f.startswith(".") or f.endswith(".partial")]
    c.check(not leftovers, "temporary files left: %s" % leftovers)

    # _SUCCESS markers.
    for i in range(SHARDS):
        marker = os.path.join(out_dir, "_results", "shard-%d-of-%d._SUCCESS" % (i, SHARDS))
        c.check(os.path.exists(marker) == (i != bad_shard),
                "%s %s (the corrupt item is in shard %d)" % (marker, "exists" if os.path.exists(marker) else "missing",
                                                            bad_shard))

    # --summary agrees.
    src, s = summary(c, out_dir)
    n_good = sum(1 for it in items if it["good"])
    want = {"shards": SHARDS, "items": len(items), "ok": n_good, "skipped": 0, "failed": 1, "frames": frames_total,
            "missing_shards": []}
    for k, v in want.items():
        c.check(s.get(k) == v, "--summary %s = %r, expected %r (summary %s)" % (k, s.get(k), v, json.dumps(s)))
    c.check(src == 1, "--summary exited %d with a failed item, expected 1" % src)
    if c.errors:
        c.errors.append("task logs:\n" + logs)
    return "%d items over %d shards (%s), corrupt item in shard %d: %s" % (
        len(items), SHARDS, "/".join(str(len(res[i])) for i in range(SHARDS)), bad_shard, state.get("bad_error"))


def case_second_run(c, slurm, ds, tmp, out_dir, state):
    c.need(state.get("mtimes"), "the first run left no outputs to skip")
    rc, tasks = submit(c, slurm, ds, tmp, out_dir, "run2")
    items = ds["items"]
    bad_shard = state["bad_shard"]
    res = read_results(c, out_dir)
    for i, (code, log) in tasks.items():
        c.check(code == (1 if i == bad_shard else 0), "task %d exited %s, expected %d:\n%s"
                % (i, code, 1 if i == bad_shard else 0, tail(log, 1500)))
    rows = {}
    for i, rs in res.items():
        for row in rs:
            check_row_fields(c, i, row)
            c.check(row.get("key") not in rows, "%s: two rows" % row.get("key"))
            rows[row.get("key")] = row
    c.check(len(rows) == len(items), "%d rows for %d items" % (len(rows), len(items)))
    frames_total = 0
    for it in items:
        row = rows.get(it["key"], {})
        if it["good"]:
            c.check(row.get("status") == "skipped", "%s: status %r (error %r), expected skipped"
                    % (it["key"], row.get("status"), row.get("error")))
            c.check(row.get("frames") == it["frames"], "%s: skipped row has frames %r, expected %d"
                    % (it["key"], row.get("frames"), it["frames"]))
            frames_total += row.get("frames") or 0
        else:
            c.check(row.get("status") == "failed", "corrupt %s: status %r" % (it["key"], row.get("status")))
            c.check("failed before" in (row.get("error") or ""),
                    "corrupt %s: error %r, expected \"failed before: ...\"" % (it["key"], row.get("error")))
    for path, mtime in state["mtimes"].items():
        c.check(os.path.isfile(path) and os.stat(path).st_mtime_ns == mtime, "%s was rewritten or removed" % path)
    for i in range(SHARDS):
        marker = os.path.join(out_dir, "_results", "shard-%d-of-%d._SUCCESS" % (i, SHARDS))
        c.check(os.path.exists(marker) == (i != bad_shard), "run 2: %s %s" % (
            marker, "exists" if os.path.exists(marker) else "missing"))
    src, s = summary(c, out_dir)
    want = {"shards": SHARDS, "items": len(items), "ok": 0, "skipped": len(items) - 1, "failed": 1,
            "missing_shards": []}
    for k, v in want.items():
        c.check(s.get(k) == v, "--summary %s = %r, expected %r (summary %s)" % (k, s.get(k), v, json.dumps(s)))
    c.check(s.get("frames") == sum(r.get("frames") or 0 for r in rows.values()),
            "--summary frames = %r, the rows add up to %d" % (s.get("frames"),
                                                             sum(r.get("frames") or 0 for r in rows.values())))
    c.check(src == 1, "--summary exited %d with a failed item, expected 1" % src)
    if c.errors:
        c.errors.append("task logs:\n" + "\n".join("task %d (exit %s):\n%s" % (i, code, tail(log, 1500))
                                                   for i, (code, log) in tasks.items()))
    return "%d skipped, 1 failed before" % (len(items) - 1)


# ------------------------------------------------------------------ main

def main():
    t0 = time.monotonic()
    tool = os.environ.get("GSTVAE_BATCH_TOOL", "")
    if not (tool and os.access(tool, os.X_OK)):
        print("FAIL setup: GSTVAE_BATCH_TOOL (%r) does not name the gst-vae-batch executable" % tool)
        sys.exit(1)
    tool = os.path.abspath(tool)
    os.environ["GSTVAE_BATCH_TOOL"] = tool
    # Jobs inherit this environment (sbatch --export=ALL): the plugin path and the registry.
    if not os.environ.get("GST_PLUGIN_PATH"):
        print("NOTE GST_PLUGIN_PATH is not set: gst-vae-batch must find the vae plugin on its own")

    tmp = tempfile.mkdtemp(prefix="gstvae-slurm-test-")
    os.chmod(tmp, 0o755)  # slurmd's job steps (and a sudo-started munged) must reach it
    slurm = Slurm(tmp)
    try:
        ds = {}

        def setup(c):
            ds.update(make_dataset(c, tmp))
            return "%d clips (%d good, 1 corrupt), manifest %s" % (len(ds["items"]), len(ds["items"]) - 1,
                                                                  ds["manifest"])

        ok = run_case("setup: clips (vp8enc ! webmmux), corrupt file, tiny VAE, manifest", setup)

        def start(c):
            for tool_name in ("sbatch", "sinfo", "slurmctld", "slurmd", "munged"):
                c.need(shutil.which(tool_name), "%s not found: install Slurm with `bash scripts/setup.sh slurm`"
                       % tool_name)
            rc, out = slurm.start()
            c.need(rc == 0, "scripts/slurm-local.sh start exited %d:\n%s" % (rc, tail(out, 6000)))
            rc, out = slurm.run(["sinfo", "-h", "-o", "%T %D %c"])
            c.need(rc == 0 and out.split()[:1] == ["idle"], "sinfo after start: %s" % out)
            return "node %s" % out.strip()

        ok = run_case("slurm: scripts/slurm-local.sh start, node idle", start) and ok
        if ok:
            out_dir = os.path.join(tmp, "latents")
            state = {}
            run_case("a. sbatch --array=0-2 --wait: each item once, rows, outputs, _SUCCESS, --summary",
                     case_first_run, slurm, ds, tmp, out_dir, state)
            if state.get("mtimes") and "bad_shard" in state:
                run_case("b. second submission: everything skipped, the corrupt item failed before",
                         case_second_run, slurm, ds, tmp, out_dir, state)
            else:
                FAILED.append("b. second submission (not run: a. left no outputs)")
                print("FAIL b. second submission (not run: a. left no outputs)")
        else:
            print("NOTE a., b. not run: the setup failed")
    finally:
        if slurm.started:
            rc, out = slurm.stop()
            if rc != 0:
                FAILED.append("slurm stop")
                RAN.append("slurm stop")
                print("FAIL slurm: scripts/slurm-local.sh stop exited %d:\n%s" % (rc, tail(out)))
        if os.environ.get("GSTVAE_SLURM_KEEP") == "1":
            print("NOTE kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("%d of %d cases failed%s (%.1f s)" % (len(FAILED), len(RAN), (": " + "; ".join(FAILED)) if FAILED else "",
                                                 time.monotonic() - t0))
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
