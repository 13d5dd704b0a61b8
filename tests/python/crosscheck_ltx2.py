#!/usr/bin/env python3
"""Cross-check the engine's LTX-2 video VAE encoder against the float64 whole-clip reference (ltx2_reference.py).

usage: scripts/python tests/python/crosscheck_ltx2.py ENCODE_TOOL [--only NAME[,NAME...]] [--keep] [--list]

ENCODE_TOOL is gst-vae-encode-file, run in fp32 on the CPU with --per-batch B: the N frames are one stream fed B at a
time, and the tool writes every latent the stream gives (T' = 1 + (N-1) div 8; trailing frames are dropped as the
official encode crops them).  Whatever B is, the latents must be the whole-clip forward's.  By default the tool
writes ComfyUI's LATENT (normalised with the file's per_channel_statistics); --latent-format raw the raw mean.

Weights are random at small widths (ltx2_reference.SMALL_BLOCKS: every block kind) in both key layouts (official
'vae.' single file, ComfyUI split VAE) and dtypes F32/F16/BF16 (the reference uses the stored, rounded values);
some files carry a decoder and an audio VAE the loader must ignore.  Pass: rel = max|a-b| / max|b| <= 1e-4 and the
exact latent count.  Also: files the loader must refuse, with the reason in the message.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import casekit  # noqa: E402
import crosscheck_wan as CW  # noqa: E402  (frames, the tool runner, rel_err)
import ltx2_reference as R  # noqa: E402
import vae_reference as V  # noqa: E402

TOL = 1e-4


def check_case(c, ctx, frames, per_batch, z=8, layout="official", dtype="F32", stub=False, latent_format=None,
               seed=1, blocks=None, log_var="uniform", padding="zeros", padding_key="encoder", extra=()):
    cfg = R.make_config(blocks or R.SMALL_BLOCKS, z=z, log_var=log_var, padding=padding, padding_key=padding_key)
    state = R.make_state(cfg, seed)
    model = ctx.path("ltx2_%s_%s.safetensors" % (layout, dtype))
    stored = R.write_checkpoint(model, state, cfg, layout, dtype, decoder_stub=stub)
    t0 = time.monotonic()
    ref = R.encode_frames(stored, cfg, frames)
    t_ref = time.monotonic() - t0
    args = list(extra)
    if latent_format is None:
        ref = R.normalise(ref, stored)  # the default: ComfyUI's normalised LATENT
    elif latent_format == "raw":
        args += ["--latent-format", "raw"]
    else:
        ref = R.normalise(ref, stored)
        args += ["--latent-format", latent_format]
    t0 = time.monotonic()
    got = ctx.encode(c, model, frames, per_batch, args)
    t_tool = time.monotonic() - t0
    shape = "x".join(map(str, ref.shape))
    c.need(got.size == ref.size, "tool wrote %d floats, expected %d (%s = T' x z x h x w)" % (got.size, ref.size, shape))
    got = got.reshape(ref.shape)
    c.need(np.isfinite(got).all(), "non-finite values in the tool's output")
    rel = CW.rel_err(got, ref)
    per_frame = [CW.rel_err(got[i], ref[i]) for i in range(ref.shape[0])]
    c.need(rel <= TOL, "rel=%.3e > %.0e (per latent: %s)" % (rel, TOL, " ".join("%.1e" % r for r in per_frame)))
    n, h, w, _ = frames.shape
    return "rel=%.3e latents %s from %d frames of %dx%d, per-batch %d, %s %s%s, %s [ref %.1fs, tool %.1fs]" % (
        rel, shape, n, w, h, per_batch, layout, dtype, ", +decoder" if stub else "", latent_format or "ltx2 (default)",
        t_ref, t_tool)


def case(frames_fn, per_batch, **kw):
    def run(c, ctx):
        return check_case(c, ctx, frames_fn(), per_batch, **kw)
    return run


def refuse_case(mutate, expect):
    """A file the loader must refuse, its message naming the fault (`expect`, a substring)."""
    def run(c, ctx):
        cfg = R.make_config(z=8)
        state = R.make_state(cfg, 3)
        tensors = {"vae." + k: v for k, v in state.items()}
        meta = {"config": json.dumps({"vae": cfg})}
        tensors, meta = mutate(tensors, meta, cfg)
        model = ctx.path("bad.safetensors")
        V.write_safetensors(model, tensors, metadata=meta)
        frames = CW.random_clip(1, 64, 64, seed=1)
        src = ctx.path("frames.rgb")
        frames.tofile(src)
        p = subprocess.run([ctx.tool, "--model", model, "--frames", src, "--n", "1", "--width", "64", "--height",
                            "64", "--format", "RGB", "--out", ctx.path("x.f32"), "--device", "cpu",
                            "--precision", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        err = p.stderr.decode("utf-8", "replace")
        c.need(p.returncode != 0, "the tool accepted the file")
        c.need(expect in err, "message lacks %r: %s" % (expect, err[-600:]))
        return err.strip().splitlines()[-1][:160]
    return run


def with_cfg(**changes):
    def mutate(tensors, meta, cfg):
        cfg = dict(cfg)
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        return tensors, {"config": json.dumps({"vae": cfg})}
    return mutate


def no_metadata(tensors, meta, cfg):
    return tensors, None


def drop(name):
    def mutate(tensors, meta, cfg):
        tensors = dict(tensors)
        del tensors[name]
        return tensors, meta
    return mutate


def extra_tensor(tensors, meta, cfg):
    tensors = dict(tensors)
    tensors["vae.encoder.down_blocks.0.res_blocks.5.conv1.conv.weight"] = torch.zeros(8, 8, 3, 3, 3)
    return tensors, meta


# Frames: pans over the photos (crosscheck_wan.pan_clip) at 64x64 (2x2 latents) or 96x64, or random fields.
CASES = [
    # Clip lengths: 1, 9, 17, 25 (= 1 + 8k) and 12, 20, 30 (not: the last 3, 3, 5 frames dropped).
    # per-batch 1, 2, 3, 8, 9, 16, 30 (all at once), each length against the whole-clip forward.
    ("t1_b1_official_f32", case(lambda: CW.pan_clip("chelsea", 1, 64, 64), 1)),
    ("t9_b1_official_f32", case(lambda: CW.pan_clip("coffee", 9, 64, 64), 1, seed=2)),
    ("t17_b2_comfy_f32", case(lambda: CW.pan_clip("astronaut", 17, 64, 64), 2, layout="comfy", seed=3)),
    ("t25_b3_official_f16_stub", case(lambda: CW.pan_clip("chelsea", 25, 64, 64), 3, dtype="F16", stub=True, seed=4)),
    ("t25_b8_comfy_bf16", case(lambda: CW.pan_clip("coffee", 25, 64, 64), 8, layout="comfy", dtype="BF16", seed=5)),
    ("t20_b9_official_f32_drop3", case(lambda: CW.pan_clip("astronaut", 20, 64, 64), 9, seed=6)),
    ("t12_b16_comfy_f32_drop3_stub", case(lambda: CW.random_clip(12, 64, 64, seed=7), 16, layout="comfy", stub=True,
                                          seed=7)),
    ("t30_b30_official_f32_drop5", case(lambda: CW.pan_clip("chelsea", 30, 96, 64), 30, seed=8)),
    ("t17_b5_official_raw", case(lambda: CW.pan_clip("coffee", 17, 64, 64), 5, latent_format="raw", seed=9)),
    ("t17_b4_official_ltx2_explicit", case(lambda: CW.pan_clip("astronaut", 17, 64, 64), 4, latent_format="ltx2",
                                           seed=10)),
    # Odd frame size: 70x45 -> 64x32 from offset (3, 6).
    ("odd_70x45_t9_b2", case(lambda: CW.pan_clip("chelsea", 9, 70, 45), 2, seed=11)),
    # Settings from the config: per-channel log-variance (2z outputs), reflect / replicate padding under either key.
    ("per_channel_logvar_t9_b3", case(lambda: CW.pan_clip("coffee", 9, 64, 64), 3, log_var="per_channel", seed=12)),
    ("reflect_padding_t9_b1", case(lambda: CW.pan_clip("astronaut", 9, 64, 64), 1, padding="reflect", seed=13)),
    ("replicate_padding_plain_key_t17_b8", case(lambda: CW.pan_clip("chelsea", 17, 64, 64), 8, padding="replicate",
                                                padding_key="plain", seed=14)),
    # LTX-2.0's own block list at a small width (z 4: widths 4..64), 64x64.
    ("ltx2_blocks_z4_t9_b3", case(lambda: CW.pan_clip("coffee", 9, 64, 64), 3, z=4, blocks=R.LTX2_BLOCKS, seed=15)),
    # Refusals.
    ("refuse_no_metadata", refuse_case(no_metadata, "no 'config' metadata")),
    ("refuse_group_norm", refuse_case(with_cfg(norm_layer="group_norm"), "group_norm")),
    ("refuse_attn_block", refuse_case(with_cfg(encoder_blocks=R.SMALL_BLOCKS + [["attn", {}]]), "block 'attn'")),
    ("refuse_unknown_block_parameter",
     refuse_case(with_cfg(encoder_blocks=[["res_x", {"num_layers": 1, "inject_noise": True}]] + R.SMALL_BLOCKS[1:]),
                 "parameter 'inject_noise'")),
    ("refuse_res_x_y", refuse_case(with_cfg(encoder_blocks=R.SMALL_BLOCKS + [["res_x_y", 1]]), "res_x_y")),
    ("refuse_padding_disagreement", refuse_case(with_cfg(spatial_padding_mode="reflect"), "disagree")),
    ("refuse_missing_tensor", refuse_case(drop("vae.encoder.down_blocks.2.res_blocks.1.conv2.conv.bias"),
                                          "encoder.down_blocks.2.res_blocks.1.conv2.conv.bias")),
    ("refuse_extra_tensor", refuse_case(extra_tensor, "down_blocks.0.res_blocks.5")),
    ("refuse_missing_statistics", refuse_case(drop("vae.per_channel_statistics.std-of-means"), "std-of-means")),
    ("refuse_no_log_var_129", refuse_case(with_cfg(latent_log_var=None), "latent_log_var")),
    ("refuse_wrong_patch", refuse_case(with_cfg(patch_size=2), "patch_size 2")),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("encode_tool", nargs="?")
    ap.add_argument("--only", action="append", default=[], help="case names (or parts of them), comma-separated")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(n for n, _ in CASES))
        return 0
    if not a.encode_tool:
        ap.print_usage(sys.stderr)
        return 2
    if not os.path.isdir(CW.MEDIA):
        print("FAIL: no %s (set GSTVAE_SHARED_DIR)" % CW.MEDIA)
        return 1
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return casekit.run_in_tempdir(CASES, a.only, "ltx2-crosscheck-",
                                  lambda tmp: CW.Ctx(os.path.abspath(a.encode_tool), tmp), a.keep)


if __name__ == "__main__":
    sys.exit(main())
