#!/usr/bin/python3
"""Encode test video into VAE latents, take them into NumPy through an appsink
and, at the same time, save them to a ComfyUI .latent file; then read the file
back and check that both hold the same values.

    GST_PLUGIN_PATH=build/gst python3 capture_latents.py --model vae.safetensors

With --frames 0 nothing is encoded: it says so and exits 0 (latentfilesink
warns and writes no file). Exits 1 when frames were asked for but no latent
came, or on a pipeline error.
"""
import argparse, json, struct, sys

import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstApp", "1.0")
from gi.repository import Gst, GstApp  # noqa: F401 (GstApp: appsink methods)
import numpy as np


def read_latent(path):
    """The 'latent_tensor' of a .latent/.safetensors file (json header + raw data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    t = header["latent_tensor"]
    begin, end = t["data_offsets"]
    return np.frombuffer(data[begin:end], dtype="<f4").reshape(t["shape"])


def non_negative(text):
    n = int(text)
    if n < 0:  # videotestsrc reads num-buffers=-1 as "no end"
        raise argparse.ArgumentTypeError("must be 0 or more")
    return n


def end_message(bus, timeout):
    """The EOS or ERROR message (None if none came within `timeout`), printing warnings on the way."""
    while True:
        msg = bus.timed_pop_filtered(timeout, Gst.MessageType.EOS | Gst.MessageType.ERROR | Gst.MessageType.WARNING)
        if msg is None or msg.type != Gst.MessageType.WARNING:
            return msg
        err, _ = msg.parse_warning()
        print("warning from %s: %s" % (msg.src.get_name(), err.message), file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="VAE .safetensors file")
    ap.add_argument("--frames", type=non_negative, default=8)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--per-batch", type=int, default=4)
    ap.add_argument("--out", default="capture.latent")
    args = ap.parse_args()

    Gst.init(None)
    pipeline = Gst.parse_launch(
        f"videotestsrc num-buffers={args.frames} ! video/x-raw,format=RGB,width={args.width},height={args.height} "
        f"! vaeencode model=\"{args.model}\" per-batch={args.per_batch} ! tee name=t "
        f"t. ! queue ! appsink name=sink sync=false  t. ! queue ! latentfilesink location=\"{args.out}\"")
    sink, bus = pipeline.get_by_name("sink"), pipeline.get_bus()
    pipeline.set_state(Gst.State.PLAYING)

    latents, msg = [], None
    while msg is None and not sink.get_property("eos"):
        sample = sink.try_pull_sample(Gst.SECOND)
        if sample is None:  # nothing yet (or the end): has the pipeline stopped?
            msg = end_message(bus, 0)
            continue
        s = sample.get_caps().get_structure(0)  # application/x-latent, see docs/latent-caps.md
        shape = [s.get_value(f) for f in ("channels", "height", "width")]
        buf = sample.get_buffer()
        latents.append(np.frombuffer(buf.extract_dup(0, buf.get_size()), dtype="<f4").reshape(shape))

    # The file is renamed into place at EOS: wait for the whole pipeline.
    msg = msg or end_message(bus, Gst.CLOCK_TIME_NONE)
    pipeline.set_state(Gst.State.NULL)
    if msg.type == Gst.MessageType.ERROR:
        err, debug = msg.parse_error()
        sys.exit("error: %s\n%s" % (err.message, debug))

    if not latents:  # nothing to stack or compare; latentfilesink wrote no file
        print("no latents: the stream ended before any frame was encoded (--frames %d); no file written"
              % args.frames, file=sys.stderr)
        sys.exit(0 if args.frames == 0 else 1)
    stream = np.stack(latents)  # N x C x h x w, ComfyUI's LATENT["samples"] layout
    saved = read_latent(args.out)
    print("latents: shape %s float32, saved to %s" % (stream.shape, args.out))
    if saved.shape != stream.shape or not np.array_equal(saved, stream):
        sys.exit("mismatch: file holds %s, appsink gave %s" % (saved.shape, stream.shape))
    print("file and appsink latents are identical")


if __name__ == "__main__":
    main()
