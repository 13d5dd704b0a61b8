#!/usr/bin/env python3
"""examples/python/ray_encode.py on a real local Ray cluster: 3 shards of a manifest of real VP8/WebM
clips and a corrupt file, one shard's Ray worker SIGKILLed mid-shard.

The cluster is `ray start --head --block` on this machine (its own temporary folder, a free GCS
port, 2 CPUs, no GPU, a 100 MiB object store, token authentication with a token of this run), and
the driver joins it with `--address`, as it would join a multi-node cluster: the cluster outlives
the driver's runs (three of them here), and its raylet and workers are separate processes the test
can find and kill. (`ray.init()` with local workers would tie the cluster to the driver's process
and hide the address path.) The cases, with the tool's contract as in test_slurm.py:

  a. first run; when the shard that holds the long clip has finished its first item and is encoding
     the long clip (its staging file exists), the Ray worker running that shard is SIGKILLed. The
     gst-vae-batch under it must die with it (no orphan holding the shard's lock), Ray retries the
     task, and the retry resumes: the items done before the kill are `skipped` (their outputs
     untouched), the long clip is encoded; every good item once, in its shard, with outputs that
     load; the corrupt item a failed row; no staging or partial file left; _SUCCESS for every shard
     but the corrupt item's; the driver prints the merged summary and exits 1 (not complete)
  b. a second run skips every good item (outputs untouched), the corrupt item "failed before", exit 1
  c. the long clip's output removed, and gst-vae-batch itself SIGKILLed while it encodes it again (its
     worker alive, as when the OOM killer picks the tool): the task raises and Ray retries it; the long
     clip is encoded, everything else skipped
  d. the manifest without the corrupt line: the data set is complete, the driver exits 0
  e. bad input: the driver's usage errors exit 2, an address where nothing listens exits 1 (both
     promptly), gst-vae-batch's usage error on the cluster exits 2

The test bounds each driver run (DRIVER_TIMEOUT) and itself (BUDGET, inside meson's timeout) and,
whatever happens (a failed case, an exception, SIGTERM), stops the cluster: SIGTERM to `ray start`,
then SIGKILL to every process still carrying this run's marker variable in its environment (the
raylet, GCS, agents, workers, a gst-vae-batch), and fails if any is left. Should the test itself be
SIGKILLed, a guard process in a session of its own (`--guard`) sees its pipe close and does the same. If Ray is not installed, it FAILS.

Environment: GSTVAE_BATCH_TOOL, GST_PLUGIN_PATH, GST_REGISTRY (as test_slurm.py); Ray: `bash
scripts/setup.sh ray` installs it into the project's venv. GSTVAE_RAY_KEEP=1 keeps the temporary
folder.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DRIVER = os.path.join(ROOT, "examples", "python", "ray_encode.py")
sys.path.insert(0, HERE)

import test_slurm as S  # noqa: E402 -- the data set, results and summary checks of the Slurm test
from casekit import FAILED, RAN, run_case  # noqa: E402

SHARDS = S.SHARDS
DRIVER_TIMEOUT = 300  # seconds per driver run at most
BUDGET = 660  # seconds for the whole test: every driver run ends by then, inside meson's 900 with the clean-up
T_END = time.monotonic() + BUDGET
LONG = (160, 120, 48, 24)  # the clip the kill lands in: width, height, frames, fps (a few seconds to encode)
MARK = "GSTVAE_RAY_TEST_RUN"


# ------------------------------------------------------------------ processes

def marked_pids(token):
    """Processes whose environment holds MARK=token: everything this run's cluster started."""
    needle = ("%s=%s\0" % (MARK, token)).encode()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/environ" % d, "rb") as f:
                if needle in f.read():
                    pids.append(int(d))
        except OSError:
            pass  # gone, or a kernel thread
    return pids


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def ppid_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid):
    """A process that exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Cluster:
    """`ray start --head --block` in its own session, and everything it starts, marked by a token."""

    def __init__(self, tmp):
        self.token = uuid.uuid4().hex
        # Ray's socket paths must stay under 108 bytes: a short folder of its own in /tmp.
        self.dir = tempfile.mkdtemp(prefix="gvr-", dir="/tmp")
        self.port = free_port()
        self.address = "127.0.0.1:%d" % self.port
        self.env = dict(os.environ)
        self.env.update({
            MARK: self.token,
            # A token of this run, not ~/.ray/auth_token: the drivers must present it.
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray 2.60 kills a dead worker's process group (and so its gst-vae-batch) itself; older Rays
            # and clusters with these settings off do not. Off here, so that the kill case shows the
            # driver's own guarantee (PR_SET_PDEATHSIG), which holds either way.
            "RAY_process_group_cleanup_enabled": "0",
            "RAY_kill_child_processes_on_worker_exit": "0",
        })
        self.env.pop("RAY_ADDRESS", None)
        self.proc = None
        self.guard = None
        self.log = os.path.join(tmp, "ray-head.log")

    def start(self, c):
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        c.need(os.access(ray_cli, os.X_OK), "%s not found: install Ray with `bash scripts/setup.sh ray`" % ray_cli)
        cmd = [ray_cli, "start", "--head", "--block", "--port=%d" % self.port, "--num-cpus=2", "--num-gpus=0",
               "--object-store-memory=%d" % (100 * 1024 * 1024), "--include-dashboard=false",
               "--dashboard-agent-listen-port=%d" % free_port(), "--disable-usage-stats",
               "--temp-dir=%s" % self.dir]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.guard = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--guard", self.token,
                                       str(self.proc.pid), self.dir], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)  # holds none of meson's pipes
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            c.need(self.proc.poll() is None, "ray start exited %s:\n%s" % (self.proc.returncode, self.head_log()))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            c.need(False, "Ray's GCS did not listen on %s within 120 s:\n%s" % (self.address, self.head_log()))
        # The raylet registers after the GCS listens; a driver that joins before it waits on its own.
        return "GCS at %s, temp dir %s" % (self.address, self.dir)

    def head_log(self):
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return S.tail(f.read(), 4000)
        except OSError:
            return "(no log)"

    def stop(self):
        """Stops everything; returns the processes that had to be SIGKILLed and those that survived."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops what it started on SIGTERM
            try:
                self.proc.wait(timeout=40)  # it drains for up to 30 s
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        killed, left = kill_marked(self.token)
        if self.guard is not None:
            self.guard.stdin.close()  # the guard finds nothing left and exits
            try:
                self.guard.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.guard.kill()
                self.guard.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        return killed, left


def kill_marked(token):
    """SIGKILLs what is left of the cluster: processes Ray's raylet started (agents, workers) outlive it,
    and so may their children. Returns (the processes killed, those still there after 10 s)."""
    killed = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = [p for p in marked_pids(token) if alive(p) and p != os.getpid()]
        if not pids:
            break
        for p in pids:
            killed.append("%d %s" % (p, cmdline(p)[:120]))
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.5)
    left = ["%d %s" % (p, cmdline(p)[:120]) for p in marked_pids(token) if alive(p) and p != os.getpid()]
    return killed, left


def guard(token, head_pid, temp_dir):
    """`test_ray.py --guard TOKEN PID DIR`, in a session of its own: waits for the end of its stdin (the
    test closes it, or dies, even of SIGKILL: meson sends SIGKILL to the test's process group 0.5 s after
    SIGTERM), then stops the cluster as Cluster.stop does."""
    sys.stdin.buffer.read()
    if alive(head_pid) and head_pid in marked_pids(token):
        os.kill(head_pid, signal.SIGTERM)
        deadline = time.monotonic() + 40
        while alive(head_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    kill_marked(token)
    shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------ the data set

def add_long_clip(c, ds, tmp):
    """A longer clip appended to the manifest, named so that its shard has another good item before it
    (so the kill lands mid-shard). Returns its item."""
    items = ds["items"]
    data = ds["data"]
    w, h, frames, fps = LONG
    shard_items = {}
    for it in items:
        if it["good"]:
            shard_items.setdefault(S.fnv1a64(it["key"]) % SHARDS, []).append(it)
    for n in range(100):
        path = os.path.join(data, "long", "long-%d.webm" % n)
        if S.fnv1a64(path) % SHARDS in shard_items:
            break
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cmd = ["gst-launch-1.0", "-q", "videotestsrc", "pattern=ball", "num-buffers=%d" % frames, "!",
           "video/x-raw,width=%d,height=%d,framerate=%d/1" % (w, h, fps), "!", "videoconvert", "!",
           "vp8enc", "deadline=1", "!", "webmmux", "!", "filesink", "location=%s" % path]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    c.need(p.returncode == 0, "generating %s failed: %s" % (path, S.tail(p.stdout.decode("utf-8", "replace"))))
    with open(ds["manifest"], encoding="utf-8") as f:
        lines = f.read().rstrip("\n").split("\n")
    lines.append(os.path.relpath(path, data))
    with open(ds["manifest"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    it = dict(input=path, key=path, frames=frames, w=w, h=h, good=True, name=os.path.basename(path),
              line=len(lines))
    items.append(it)
    return it


def staging_files(out_dir):
    return [os.path.join(r, f) for r, _, fs in os.walk(out_dir) for f in fs
            if f.startswith(".") or ".partial" in f or ".inprogress-" in f]


# ------------------------------------------------------------------ the driver

def start_driver(cluster, ds, out_dir, manifest, log_path):
    cmd = [sys.executable, DRIVER, "--shards", str(SHARDS), "--address", cluster.address,
           "--tool", os.environ["GSTVAE_BATCH_TOOL"], "--max-retries", "2", "--",
           "--manifest", manifest, "--model", ds["model"], "--out-dir", out_dir, "--per-batch", str(S.PER_BATCH)]
    out = open(log_path + ".out", "wb")
    err = open(log_path + ".err", "wb")
    proc = subprocess.Popen(cmd, env=cluster.env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                            start_new_session=True)
    out.close()
    err.close()
    return proc


def driver_deadline():
    return min(time.monotonic() + DRIVER_TIMEOUT, T_END)


def finish_driver(c, proc, log_path, deadline):
    """Waits for the driver until `deadline`; kills it after that. Returns (exit status, stdout, stderr)."""
    try:
        proc.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        c.need(False, "the driver did not finish in time (%d s per run, %d s for the test); killed:\n%s"
               % (DRIVER_TIMEOUT, BUDGET, S.tail(read(log_path + ".err"))))
    return proc.returncode, read(log_path + ".out"), read(log_path + ".err")


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def printed_summary(c, out, err):
    lines = [l for l in out.splitlines() if l.startswith("{")]
    c.need(lines, "the driver printed no summary; stdout:\n%s\nstderr:\n%s" % (S.tail(out), S.tail(err)))
    return json.loads(lines[-1])


def check_driver_lines(c, err):
    """Each shard's result reported once: the driver submitted each shard once."""
    for i in range(SHARDS):
        n = len(re.findall(r"^ray_encode: shard %d/%d (exited|did not finish)" % (i, SHARDS), err, re.M))
        c.check(n == 1, "the driver reported shard %d %d times:\n%s" % (i, n, S.tail(err)))


def check_final_rows(c, ds, out_dir, statuses):
    """Every item once, in its shard, with the status statuses(item) allows; good outputs load.
    Returns {key: row}."""
    res = S.read_results(c, out_dir)
    rows = {}
    for i, rs in res.items():
        for row in rs:
            S.check_row_fields(c, i, row)
            key = row.get("key")
            c.check(key not in rows, "%s: two rows" % key)
            c.check(S.fnv1a64(key or "") % SHARDS == i, "%s is in shard %d, expected %d"
                    % (key, i, S.fnv1a64(key or "") % SHARDS))
            rows[key] = row
    keys = {it["key"] for it in ds["items"]}
    c.check(set(rows) == keys, "rows for %s, manifest items %s" % (sorted(rows), sorted(keys)))
    for it in ds["items"]:
        row = rows.get(it["key"])
        if row is None:
            continue
        want = statuses(it)
        c.check(row.get("status") in want, "%s: status %r (error %r), expected %s"
                % (it["key"], row.get("status"), row.get("error"), "/".join(want)))
        if not it["good"]:
            continue
        c.check(row.get("frames") == it["frames"], "%s: frames %r, expected %d"
                % (it["key"], row.get("frames"), it["frames"]))
        out = os.path.normpath(os.path.join(out_dir, row.get("output") or ""))
        c.check(out == os.path.normpath(S.expected_output(out_dir, it)), "%s: output %s" % (it["key"], out))
        try:
            header, meta, _ = S.read_safetensors_header(out)
            shape = [it["frames"], S.Z, it["h"] // S.DOWN, it["w"] // S.DOWN]
            c.check(header.get("latent_tensor", {}).get("shape") == shape, "%s: latent_tensor %r, expected %r"
                    % (out, header.get("latent_tensor"), shape))
            c.check(meta.get("batch_key") == it["key"], "%s: batch_key %r" % (out, meta.get("batch_key")))
        except Exception as e:  # noqa: BLE001 -- an unreadable output is a failed check
            c.check(False, "%s: unreadable: %s" % (out, e))
    left = staging_files(out_dir)
    c.check(not left, "staging or partial files left: %s" % left)
    return rows


def output_ids(ds, out_dir):
    ids = {}
    for it in ds["items"]:
        p = S.expected_output(out_dir, it)
        if it["good"] and os.path.isfile(p):
            st = os.stat(p)
            ids[p] = (st.st_ino, st.st_mtime_ns)
    return ids


# ------------------------------------------------------------------ cases

def run_and_kill(c, cluster, ds, long_it, out_dir, log, target):
    """Runs the driver; once the shard that holds the long clip has written a row and is encoding the
    long clip, SIGKILLs that shard's Ray worker (target "worker") or its gst-vae-batch ("tool").
    Returns (exit status, stdout, stderr, what was killed)."""
    kill_shard = S.fnv1a64(long_it["key"]) % SHARDS
    results = os.path.join(out_dir, "_results", "shard-%d-of-%d.jsonl" % (kill_shard, SHARDS))
    long_out = os.path.basename(S.expected_output(out_dir, long_it))
    tool = os.environ["GSTVAE_BATCH_TOOL"]
    deadline = driver_deadline()
    proc = start_driver(cluster, ds, out_dir, ds["manifest"], log)
    killed = None
    try:
        # The results file is rewritten at the start of each run: a row in it is this run's.
        while time.monotonic() < deadline and proc.poll() is None:
            rows = read(results).splitlines() if os.path.isfile(results) else []
            # The staging file (latentfilesink's ".partial-" file of ".NAME.inprogress-HOST-PID.latent")
            # exists from the item's first latent on.
            staged = any(long_out + ".inprogress-" in f for f in os.listdir(out_dir)) \
                if os.path.isdir(out_dir) else False
            if rows and staged:
                tools = [p for p in marked_pids(cluster.token) if alive(p) and cmdline(p).startswith(tool + " ")
                         and " --shard %d/%d " % (kill_shard, SHARDS) in cmdline(p) + " "]
                c.need(len(tools) == 1, "the long clip is staged but %d gst-vae-batch --shard %d/%d processes run"
                       % (len(tools), kill_shard, SHARDS))
                worker = ppid_of(tools[0])
                c.need(worker and cmdline(worker).startswith("ray::"),
                       "the parent of gst-vae-batch (pid %s) is not a Ray worker: %r" % (worker, cmdline(worker or 0)))
                before = output_ids(ds, out_dir)
                os.kill(worker if target == "worker" else tools[0], signal.SIGKILL)
                killed = dict(worker=worker, tool=tools[0], rows=len(rows), before=before, shard=kill_shard)
                break
            time.sleep(0.05)
        c.need(killed, "the driver ended (exit %s) before shard %d reached the long clip: the kill point was missed;"
               " stderr:\n%s" % (proc.poll(), kill_shard, S.tail(read(log + ".err"))))
        if target == "worker":
            # The tool must die with its worker (PR_SET_PDEATHSIG), well before the retry wants its lock.
            t_kill = time.monotonic()
            while alive(killed["tool"]) and time.monotonic() - t_kill < 5:
                time.sleep(0.05)
            c.check(not alive(killed["tool"]), "gst-vae-batch (pid %d) outlived its killed worker by 5 s"
                    % killed["tool"])
        rc, out, err = finish_driver(c, proc, log, deadline)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, out, err, killed


def case_first_run(c, cluster, ds, long_it, tmp, out_dir, state):
    rc, out, err, killed = run_and_kill(c, cluster, ds, long_it, out_dir, os.path.join(tmp, "run1"), "worker")
    kill_shard = killed["shard"]
    s = printed_summary(c, out, err)
    c.check(rc == 1, "driver exited %d with a failed item, expected 1; stderr:\n%s" % (rc, S.tail(err)))
    check_driver_lines(c, err)
    c.check(re.search(r"^ray_encode: shard %d/%d exited 0" % (kill_shard, SHARDS), err, re.M)
            or kill_shard == S.fnv1a64(next(it for it in ds["items"] if not it["good"])["key"]) % SHARDS,
            "the killed shard %d did not end with exit 0 after the retry:\n%s" % (kill_shard, S.tail(err)))

    # Items of the killed shard done before the kill: skipped by the retry, their files untouched.
    before = killed["before"]
    done_before = {it["key"] for it in ds["items"] if it["good"] and S.expected_output(out_dir, it) in before
                   and S.fnv1a64(it["key"]) % SHARDS == kill_shard}
    c.check(done_before, "no output of shard %d existed at the kill (it had %d rows)" % (kill_shard, killed["rows"]))

    def statuses(it):
        if not it["good"]:
            return ("failed",)
        return ("skipped",) if it["key"] in done_before else ("ok", "skipped")

    rows = check_final_rows(c, ds, out_dir, statuses)
    for p, ident in before.items():
        c.check(os.path.isfile(p) and (os.stat(p).st_ino, os.stat(p).st_mtime_ns) == ident,
                "%s, finished before the kill, was rewritten" % p)
    c.check(rows.get(long_it["key"], {}).get("status") == "ok", "the long clip (killed mid-item): %r"
            % rows.get(long_it["key"]))
    bad = [it for it in ds["items"] if not it["good"]][0]
    bad_shard = S.fnv1a64(bad["key"]) % SHARDS
    for i in range(SHARDS):
        marker = os.path.join(out_dir, "_results", "shard-%d-of-%d._SUCCESS" % (i, SHARDS))
        c.check(os.path.exists(marker) == (i != bad_shard), "%s %s" % (marker, "exists" if os.path.exists(marker)
                                                                       else "missing"))
    n_good = sum(1 for it in ds["items"] if it["good"])
    want = {"shards": SHARDS, "items": len(ds["items"]), "failed": 1, "missing_shards": [],
            "frames": sum(it["frames"] for it in ds["items"] if it["good"])}
    for k, v in want.items():
        c.check(s.get(k) == v, "summary %s = %r, expected %r: %s" % (k, s.get(k), v, json.dumps(s)))
    c.check(s.get("ok", 0) + s.get("skipped", 0) == n_good and s.get("skipped") == len(done_before),
            "summary ok %r + skipped %r, expected %d ok + %d skipped (done before the kill)"
            % (s.get("ok"), s.get("skipped"), n_good - len(done_before), len(done_before)))
    state["ids"] = output_ids(ds, out_dir)
    state["bad_shard"] = bad_shard
    if c.errors:
        c.errors.append("driver stderr:\n" + S.tail(err, 6000))
    return "killed worker %d (gst-vae-batch %d) of shard %d after %d row(s); retried: %d skipped, %d ok" % (
        killed["worker"], killed["tool"], kill_shard, killed["rows"], s.get("skipped"), s.get("ok"))


def case_second_run(c, cluster, ds, tmp, out_dir, state):
    c.need(state.get("ids"), "the first run left no outputs")
    log = os.path.join(tmp, "run2")
    proc = start_driver(cluster, ds, out_dir, ds["manifest"], log)
    try:
        rc, out, err = finish_driver(c, proc, log, driver_deadline())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    s = printed_summary(c, out, err)
    c.check(rc == 1, "driver exited %d, expected 1 (the corrupt item); stderr:\n%s" % (rc, S.tail(err)))
    check_driver_lines(c, err)
    rows = check_final_rows(c, ds, out_dir, lambda it: ("skipped",) if it["good"] else ("failed",))
    bad = [it for it in ds["items"] if not it["good"]][0]
    c.check("failed before" in (rows.get(bad["key"], {}).get("error") or ""),
            "corrupt item: error %r" % rows.get(bad["key"], {}).get("error"))
    c.check(output_ids(ds, out_dir) == state["ids"], "outputs were rewritten by the second run")
    want = {"ok": 0, "skipped": len(ds["items"]) - 1, "failed": 1, "missing_shards": []}
    for k, v in want.items():
        c.check(s.get(k) == v, "summary %s = %r, expected %r: %s" % (k, s.get(k), v, json.dumps(s)))
    return "%d skipped, 1 failed before, exit 1" % s.get("skipped", 0)


def case_tool_killed(c, cluster, ds, long_it, tmp, out_dir, state):
    """gst-vae-batch SIGKILLed on its own (as the OOM killer would pick it), its worker alive: the task
    raises, and Ray retries it (retry_exceptions)."""
    c.need(state.get("ids"), "the first run left no outputs")
    long_path = S.expected_output(out_dir, long_it)
    os.unlink(long_path)  # something to encode again, so that there is a run to kill
    rc, out, err, killed = run_and_kill(c, cluster, ds, long_it, out_dir, os.path.join(tmp, "run-tool"), "tool")
    s = printed_summary(c, out, err)
    c.check(rc == 1, "driver exited %d, expected 1 (the corrupt item); stderr:\n%s" % (rc, S.tail(err)))
    check_driver_lines(c, err)
    rows = check_final_rows(c, ds, out_dir, lambda it: ("failed",) if not it["good"] else
                            ("ok",) if it["key"] == long_it["key"] else ("skipped",))
    c.check(rows.get(long_it["key"], {}).get("status") == "ok", "the long clip after the retry: %r"
            % rows.get(long_it["key"]))
    ids = output_ids(ds, out_dir)
    c.check({p: v for p, v in ids.items() if p != long_path} == {p: v for p, v in state["ids"].items()
                                                                 if p != long_path},
            "outputs other than the long clip's were rewritten")
    n_good = sum(1 for it in ds["items"] if it["good"])
    want = {"ok": 1, "skipped": n_good - 1, "failed": 1, "missing_shards": []}
    for k, v in want.items():
        c.check(s.get(k) == v, "summary %s = %r, expected %r: %s" % (k, s.get(k), v, json.dumps(s)))
    state["ids"] = ids
    if c.errors:
        c.errors.append("driver stderr:\n" + S.tail(err, 6000))
    return "killed gst-vae-batch %d of shard %d (worker %d kept); retried: the long clip ok, %d skipped" % (
        killed["tool"], killed["shard"], killed["worker"], s.get("skipped", 0))


def case_complete(c, cluster, ds, tmp, out_dir, state):
    c.need(state.get("ids"), "the first run left no outputs")
    bad = [it for it in ds["items"] if not it["good"]][0]
    manifest = os.path.join(ds["data"], "manifest-good.txt")
    with open(ds["manifest"], encoding="utf-8") as f:
        lines = [l for l in f.read().split("\n") if os.path.basename(bad["input"]) not in l]
    with open(manifest, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    log = os.path.join(tmp, "run3")
    proc = start_driver(cluster, ds, out_dir, manifest, log)
    try:
        rc, out, err = finish_driver(c, proc, log, driver_deadline())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    s = printed_summary(c, out, err)
    c.check(rc == 0, "driver exited %d on a complete data set; stderr:\n%s" % (rc, S.tail(err)))
    n_good = sum(1 for it in ds["items"] if it["good"])
    want = {"ok": 0, "skipped": n_good, "failed": 0, "items": n_good, "missing_shards": []}
    for k, v in want.items():
        c.check(s.get(k) == v, "summary %s = %r, expected %r: %s" % (k, s.get(k), v, json.dumps(s)))
    for i in range(SHARDS):
        marker = os.path.join(out_dir, "_results", "shard-%d-of-%d._SUCCESS" % (i, SHARDS))
        c.check(os.path.exists(marker), "%s missing" % marker)
    c.check(output_ids(ds, out_dir) == state["ids"], "outputs were rewritten")
    return "%d skipped, exit 0" % s.get("skipped", 0)


def case_bad_input(c, cluster, ds, tmp, out_dir, state):
    """Usage errors end in exit 2 with a message, a cluster that does not answer in exit 1, both
    promptly; a usage error of gst-vae-batch on the cluster ends the run with exit 2."""
    tool = os.environ["GSTVAE_BATCH_TOOL"]
    other = os.path.join(tmp, "latents-bad")
    base = [sys.executable, DRIVER, "--tool", tool]
    tool_args = ["--manifest", ds["manifest"], "--model", ds["model"]]
    usage = [
        (["--shards", "3", "--"] + tool_args, "--out-dir"),                          # no --out-dir
        (["--shards", "3"] + tool_args + ["--out-dir", other], "`--`"),               # no `--`
        (["--shards", "3", "--"] + tool_args + ["--out-dir", other, "--shard", "0/3"], "--shard"),
        (["--shards", "0", "--"] + tool_args + ["--out-dir", other], "--shards"),
        (["--shards", "3", "--gpus-per-task", "x", "--"] + tool_args + ["--out-dir", other], "--gpus-per-task"),
    ]
    for args, word in usage:
        t0 = time.monotonic()
        p = subprocess.run(base + args, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=60)
        err = p.stderr.decode("utf-8", "replace")
        c.check(p.returncode == 2 and word in err, "%s: exit %d (expected 2, naming %s):\n%s"
                % (" ".join(args[:4]), p.returncode, word, S.tail(err, 800)))
        c.check(time.monotonic() - t0 < 30, "%s: took %.0f s" % (" ".join(args[:4]), time.monotonic() - t0))
    t0 = time.monotonic()
    p = subprocess.run(base + ["--shards", "3", "--address", "127.0.0.1:%d" % free_port(), "--connect-timeout",
                               "3", "--"] + tool_args + ["--out-dir", other], env=cluster.env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    err = p.stderr.decode("utf-8", "replace")
    c.check(p.returncode == 1 and "no Ray cluster answers" in err, "an address where nothing listens: exit %d:\n%s"
            % (p.returncode, S.tail(err, 800)))
    c.check(time.monotonic() - t0 < 30, "an address where nothing listens: took %.0f s" % (time.monotonic() - t0))
    # gst-vae-batch's own usage error (an unknown option), found by the tasks on the cluster.
    log = os.path.join(tmp, "run-usage")
    cmd = base + ["--shards", "3", "--address", cluster.address, "--"] + tool_args + ["--out-dir", other,
                                                                                      "--no-such-option"]
    out_f, err_f = open(log + ".out", "wb"), open(log + ".err", "wb")
    proc = subprocess.Popen(cmd, env=cluster.env, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                            start_new_session=True)
    out_f.close()
    err_f.close()
    try:
        rc, out, err = finish_driver(c, proc, log, driver_deadline())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    c.check(rc == 2, "gst-vae-batch --no-such-option: driver exit %d, expected 2:\n%s" % (rc, S.tail(err)))
    c.check(re.search(r"^ray_encode: shard \d/3 exited 2", err, re.M), "no shard reported exit 2:\n%s" % S.tail(err))
    return "5 usage errors (exit 2), a closed port (exit 1), the tool's usage error on the cluster (exit 2)"


# ------------------------------------------------------------------ main

def on_sigterm(signum, frame):
    # meson's timeout sends SIGTERM (SIGKILL 0.5 s later): leave through the finally blocks at once.
    raise KeyboardInterrupt("SIGTERM")


def main():
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, on_sigterm)
    tool = os.environ.get("GSTVAE_BATCH_TOOL", "")
    if not (tool and os.access(tool, os.X_OK)):
        print("FAIL setup: GSTVAE_BATCH_TOOL (%r) does not name the gst-vae-batch executable" % tool)
        sys.exit(1)
    os.environ["GSTVAE_BATCH_TOOL"] = os.path.abspath(tool)

    tmp = tempfile.mkdtemp(prefix="gstvae-ray-test-")
    cluster = None
    try:
        ds = {}
        long_it = {}

        def setup(c):
            try:
                import ray
            except ImportError as e:
                c.need(False, "Ray is not installed in %s (%s): `bash scripts/setup.sh ray`" % (sys.executable, e))
            ds.update(S.make_dataset(c, tmp))
            long_it.update(add_long_clip(c, ds, tmp))
            return "Ray %s; %d items (1 corrupt), the long clip %s in shard %d" % (
                ray.__version__, len(ds["items"]), long_it["name"], S.fnv1a64(long_it["key"]) % SHARDS)

        ok = run_case("setup: Ray installed, clips, corrupt file, tiny VAE, manifest", setup)
        if ok:
            cluster = Cluster(tmp)
            ok = run_case("ray: `ray start --head` (2 CPUs, 100 MiB object store)", cluster.start)
        if ok:
            out_dir = os.path.join(tmp, "latents")
            state = {}
            run_case("a. ray_encode.py, a worker SIGKILLed mid-shard: retried, each item once, summary, exit 1",
                     case_first_run, cluster, ds, long_it, tmp, out_dir, state)
            run_case("b. second run: everything skipped, the corrupt item failed before, exit 1",
                     case_second_run, cluster, ds, tmp, out_dir, state)
            run_case("c. gst-vae-batch SIGKILLed mid-item, its worker alive: the task retried, exit 1",
                     case_tool_killed, cluster, ds, long_it, tmp, out_dir, state)
            run_case("d. without the corrupt line: complete, exit 0", case_complete, cluster, ds, tmp, out_dir, state)
            run_case("e. bad input: usage errors exit 2, no cluster exit 1, the tool's usage error exit 2",
                     case_bad_input, cluster, ds, tmp, out_dir, state)
        else:
            print("NOTE a.-e. not run: the setup failed")
    except KeyboardInterrupt as e:
        FAILED.append("interrupted (%s)" % e)
        RAN.append("interrupted")
        print("FAIL interrupted (%s): stopping the cluster" % e)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up must run to its end
        if cluster is not None:
            killed, left = cluster.stop()
            RAN.append("ray stop")
            if left:
                FAILED.append("ray stop")
                print("FAIL ray stop: processes left after SIGKILL:\n    " + "\n    ".join(left))
            else:
                print("PASS ray stop: no process of the cluster left%s" % (
                    " (SIGKILLed after `ray start` ended: %s)" % "; ".join(killed) if killed else ""))
        if os.environ.get("GSTVAE_RAY_KEEP") == "1":
            print("NOTE kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("%d of %d cases failed%s (%.1f s)" % (len(FAILED), len(RAN), (": " + "; ".join(FAILED)) if FAILED else "",
                                                 time.monotonic() - t0))
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guard"]:
        guard(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
