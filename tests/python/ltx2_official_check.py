#!/usr/bin/env python3
"""Manual check: ltx2_reference.py against Lightricks' own `VideoEncoder` (LTX-2 ltx-core), float64, random weights.

Not part of the test suites (the official package is not a dependency): put LTX-2's packages/ltx-core/src and its
imports (einops, safetensors) on PYTHONPATH, then

    PYTHONPATH=.../ltx-core/src:... python3 tests/python/ltx2_official_check.py

It builds the official encoder from the same `vae` config, loads ltx2_reference's random weights (the official
module's names are the checkpoint's without `encoder.`), and compares the normalised means of clips of 1, 9, 17
and 20 frames (the last cropped to 17 by the official code) for several configurations.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ltx2_reference as R  # noqa: E402
from ltx_core.model.video_vae.model_configurator import VideoEncoderConfigurator  # noqa: E402


def official(cfg, state):
    enc = VideoEncoderConfigurator.from_metadata({"config": {"vae": cfg}}).to(torch.float64)
    sd = {}
    for k, v in state.items():
        if k.startswith("encoder."):
            sd[k[len("encoder."):]] = v
        elif k.split(".")[-1] in ("mean-of-means", "std-of-means"):
            sd[k] = v
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return enc.eval()


def main():
    worst = 0.0
    for name, cfg in [("small uniform zeros", R.make_config(z=8)),
                      ("small per_channel reflect", R.make_config(z=8, log_var="per_channel", padding="reflect",
                                                                  padding_key="plain")),
                      ("LTX-2.0 blocks z4", R.make_config(R.LTX2_BLOCKS, z=4))]:
        state = R.make_state(cfg, seed=4)
        enc = official(cfg, state)
        g = torch.Generator().manual_seed(5)
        x = torch.rand(1, 3, 20, 64, 96, generator=g, dtype=torch.float64) * 2 - 1
        for n in (1, 9, 17, 20):
            with torch.no_grad():
                want = enc(x[:, :, :n])
                mean, _ = R.encoder_forward(state, cfg, x[:, :, :n - (n - 1) % 8])
            mu = state["per_channel_statistics.mean-of-means"].view(1, -1, 1, 1, 1)
            sd = state["per_channel_statistics.std-of-means"].view(1, -1, 1, 1, 1)
            got = (mean - mu) / sd
            rel = ((got - want).abs().max() / want.abs().max()).item()
            worst = max(worst, rel)
            print("%-28s %2d frames -> %s  rel %.1e" % (name, n, tuple(want.shape), rel))
    print("worst rel %.1e: %s" % (worst, "PASS" if worst < 1e-12 else "FAIL"))
    return 0 if worst < 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
