#!/usr/bin/env python3
"""Encode a manifest into latents on a Ray cluster: one Ray task per shard, each
running `gst-vae-batch --shard I/N`, then the merged `gst-vae-batch --summary`.

    python3 ray_encode.py --shards 64 [--address HOST:PORT] -- \\
        --manifest /data/videos/manifest.txt --model /data/models/sdxl_vae.safetensors \\
        --out-dir /data/latents --per-batch 16

Everything after `--` goes to gst-vae-batch as it is (it must hold `--out-dir`; the
driver adds `--shard`). Each task asks for one GPU (`num_gpus=1`) when the cluster
has GPUs (Ray then sets CUDA_VISIBLE_DEVICES and `--device auto` picks that GPU),
and only CPUs otherwise; `--cpus-per-task` CPUs either way (decoding and scaling
run on the CPU).

A lost worker (its process killed, its node gone) is Ray's to handle: the task is
retried (`--max-retries`, Ray's default of 3). gst-vae-batch runs as a child that
dies with the worker (PR_SET_PDEATHSIG), so a retry never finds the shard's lock
held by an orphan; a gst-vae-batch killed by a signal on its own (the OOM killer)
is retried the same way. A retry resumes: finished items are skipped, the killed
item is encoded again and the dead run's staging files are removed (docs/scale-out.md,
"Resuming"). Exit status 1 of a shard (failed items) is not retried: a rerun would only
repeat "failed before".

Exit status: that of `gst-vae-batch --summary` (0 only when the data set is complete:
every shard done, nothing failed), or 2 for a usage error (here or in gst-vae-batch),
1 when the summary could not be run. Running the driver again resumes.

With --address HOST:PORT (or RAY_ADDRESS) it joins that cluster, after waiting up to
--connect-timeout seconds for it to answer (exit 1 if it does not; ray.init() alone
would retry for minutes). Without either it starts a local Ray on this machine,
with an object store of --object-store-memory bytes (the shards pass nothing through
it). The tool (--tool, default: gst-vae-batch on PATH), the manifest, the model and
--out-dir must be at the same paths on every node, and the workers need the `vae`
plugin: GST_PLUGIN_PATH, GST_PLUGIN_SYSTEM_PATH and GST_REGISTRY, where set here,
are passed to the tasks.
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

# Each item's log line matters (which one failed, and why): no merging of similar lines.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
import ray  # noqa: E402

FORWARDED_ENV = ("GST_PLUGIN_PATH", "GST_PLUGIN_SYSTEM_PATH", "GST_REGISTRY")
EXIT_USAGE = 2
EXIT_LOCKED = 3  # gst-vae-batch: another run of this shard holds its lock


class ShardKilled(Exception):
    """gst-vae-batch died of a signal: a lost run, for Ray to retry like a lost worker."""


# Runs in the worker as the child, between fork and exec of gst-vae-batch: the
# child gets SIGKILL when the worker dies. preexec_fn is not safe in a threaded
# process (a Ray worker is one), so the child is a small Python that sets it and
# execs; it checks that its parent is still the worker, which closes the race of
# a worker dying before prctl.
_EXEC_WITH_PDEATHSIG = r"""
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass  # not Linux: no fate sharing, the lock still keeps a second run out
if os.getppid() != parent:
    os._exit(137)
os.execv(sys.argv[2], sys.argv[2:])
"""


@ray.remote
def run_shard(tool, shard, shards, args, lock_wait):
    """gst-vae-batch --shard shard/shards ARGS; returns (shard, exit status, seconds, host)."""
    host = socket.gethostname()
    t0 = time.monotonic()
    cmd = [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), tool,
           "--shard", "%d/%d" % (shard, shards)] + list(args)
    print("ray_encode: shard %d/%d on %s (worker pid %d)" % (shard, shards, host, os.getpid()),
          file=sys.stderr, flush=True)
    delay = 1.0
    while True:
        # The tool's stderr (one line per item) goes to the worker's, which Ray shows in the driver.
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode
        # Exit 3: another run of the shard holds the lock, e.g. a dying run of an earlier
        # attempt that has not yet released it. Wait for it, within lock_wait seconds.
        if rc != EXIT_LOCKED or time.monotonic() - t0 + delay > lock_wait:
            break
        print("ray_encode: shard %d/%d is locked by another run; trying again in %.0f s"
              % (shard, shards, delay), file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
    if rc < 0:
        raise ShardKilled("gst-vae-batch --shard %d/%d was killed by signal %d on %s" % (shard, shards, -rc, host))
    return shard, rc, time.monotonic() - t0, host


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s --shards N [options] -- GST-VAE-BATCH-ARGS")
    p.add_argument("--shards", type=int, required=True, help="N: shards of the data set (keep it fixed)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--tool", default="gst-vae-batch", help="gst-vae-batch executable (same path on every node)")
    p.add_argument("--cpus-per-task", type=float, default=1, help="CPUs per task (1)")
    p.add_argument("--gpus-per-task", default="auto",
                   help="GPUs per task: auto (1 when the cluster has GPUs, else 0) or a number")
    p.add_argument("--max-retries", type=int, default=3, help="Ray retries of a shard whose worker was lost (3)")
    p.add_argument("--lock-wait", type=float, default=120,
                   help="seconds a task waits for a shard locked by another run (120)")
    p.add_argument("--connect-timeout", type=float, default=60,
                   help="seconds to wait for the cluster at --address to answer (60)")
    p.add_argument("--object-store-memory", type=int, default=100 * 1024 * 1024,
                   help="object store bytes of a local Ray (100 MiB: the tasks pass only small results)")
    cut = argv.index("--") if "--" in argv else len(argv)
    args, unknown = p.parse_known_args(argv[:cut])  # --help ends here
    if cut == len(argv):
        p.error("give gst-vae-batch's arguments after `--`%s" % (" (%s is not the driver's)" % unknown[0]
                                                                  if unknown else ""))
    if unknown:
        p.error("unrecognized arguments: %s (gst-vae-batch's go after `--`)" % " ".join(unknown))
    args.tool_args = argv[cut + 1:]
    if args.shards < 1:
        p.error("--shards must be 1 or more")
    if args.max_retries < 0:
        p.error("--max-retries must be 0 or more")
    for bad in ("--shard", "--shards", "--summary"):
        if any(a == bad or a.startswith(bad + "=") for a in args.tool_args):
            p.error("%s is the driver's to set; do not pass it to gst-vae-batch" % bad)
    out = [args.tool_args[i + 1] for i, a in enumerate(args.tool_args[:-1]) if a == "--out-dir"]
    out += [a.split("=", 1)[1] for a in args.tool_args if a.startswith("--out-dir=")]
    if len(out) != 1:
        p.error("gst-vae-batch's arguments must hold one --out-dir (for the summary)")
    args.out_dir = out[0]
    tool = shutil.which(args.tool)
    if not tool:
        p.error("%s: not found or not executable" % args.tool)
    args.tool = os.path.abspath(tool)
    if args.gpus_per_task != "auto":
        try:
            args.gpus_per_task = float(args.gpus_per_task)
        except ValueError:
            p.error("--gpus-per-task: auto or a number, not %r" % args.gpus_per_task)
    return args


def wait_for_gcs(address, timeout):
    """Whether HOST:PORT accepts a connection within `timeout` s. ray.init() retries an address where
    nothing listens for minutes, logging warnings: a typo would look like a hang. Other forms ("auto",
    "ray://...") are Ray's to resolve: True."""
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", address)
    if not m:
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((m.group(1), int(m.group(2))), timeout=5).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(1)


def main(argv):
    args = parse_args(argv)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        if not wait_for_gcs(address, args.connect_timeout):
            print("ray_encode: no Ray cluster answers at %s (waited %.0f s)" % (address, args.connect_timeout),
                  file=sys.stderr)
            return 1
        ray.init(address=args.address, runtime_env=runtime_env)
    else:
        ray.init(object_store_memory=args.object_store_memory, include_dashboard=False, runtime_env=runtime_env)

    gpus = args.gpus_per_task
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = run_shard.options(num_cpus=args.cpus_per_task, num_gpus=gpus, max_retries=args.max_retries,
                             retry_exceptions=[ShardKilled])
    print("ray_encode: %d shards, %s GPU and %s CPU per task, on %s" % (
        args.shards, gpus, args.cpus_per_task, json.dumps(ray.cluster_resources(), sort_keys=True)),
        file=sys.stderr, flush=True)
    pending = {task.remote(args.tool, i, args.shards, args.tool_args, args.lock_wait): i for i in range(args.shards)}
    usage_error = False
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ref)
        try:
            _, rc, seconds, host = ray.get(ref)
            print("ray_encode: shard %d/%d exited %d on %s after %.1f s" % (i, args.shards, rc, host, seconds),
                  file=sys.stderr, flush=True)
            if rc == EXIT_USAGE and not usage_error:
                # The same arguments fail every shard: stop the rest.
                usage_error = True
                for r in pending:
                    ray.cancel(r, force=True)
        except (ray.exceptions.RayError, ShardKilled) as e:
            # Retries used up (or cancelled): the summary reports the shard as missing.
            why = str(e).strip().splitlines()
            print("ray_encode: shard %d/%d did not finish: %s" % (i, args.shards, why[0] if why else type(e).__name__),
                  file=sys.stderr, flush=True)
    ray.shutdown()

    s = subprocess.run([args.tool, "--summary", args.out_dir], stdout=subprocess.PIPE, text=True)
    lines = [l for l in s.stdout.splitlines() if l.startswith("{")]
    print(lines[-1] if lines else s.stdout, flush=True)
    if usage_error:
        return EXIT_USAGE
    return s.returncode if s.returncode >= 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
