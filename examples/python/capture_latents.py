#!/usr/bin/python3
"""Encode test video into VAE latents, take them into NumPy through an appsink
and, at the same time, save them to a ComfyUI .latent file; then read the file
back and check that both hold the same values.

    GST_PLUGIN_PATH=build/gst python3 capture_latents.py --model vae.safetensors
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="VAE .safetensors file")
    ap.add_argument("--frames", type=int, default=8)
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

    latents, msg, done = [], None, Gst.MessageType.EOS | Gst.MessageType.ERROR
    while msg is None and not sink.get_property("eos"):
        sample = sink.try_pull_sample(Gst.SECOND)
        if sample is None:  # nothing yet (or the end): has the pipeline stopped?
            msg = bus.pop_filtered(done)
            continue
        s = sample.get_caps().get_structure(0)  # application/x-latent, see docs/latent-caps.md
        shape = [s.get_value(f) for f in ("channels", "height", "width")]
        buf = sample.get_buffer()
        latents.append(np.frombuffer(buf.extract_dup(0, buf.get_size()), dtype="<f4").reshape(shape))

    # The file is renamed into place at EOS: wait for the whole pipeline.
    msg = msg or bus.timed_pop_filtered(Gst.CLOCK_TIME_NONE, done)
    pipeline.set_state(Gst.State.NULL)
    if msg.type == Gst.MessageType.ERROR:
        err, debug = msg.parse_error()
        sys.exit("error: %s\n%s" % (err.message, debug))

    stream = np.stack(latents)  # N x C x h x w, ComfyUI's LATENT["samples"] layout
    saved = read_latent(args.out)
    print("latents: shape %s float32, saved to %s" % (stream.shape, args.out))
    if saved.shape != stream.shape or not np.array_equal(saved, stream):
        sys.exit("mismatch: file holds %s, appsink gave %s" % (saved.shape, stream.shape))
    print("file and appsink latents are identical")


if __name__ == "__main__":
    main()
