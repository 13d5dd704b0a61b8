#!/usr/bin/env python3
"""Writes the seed corpus of fuzz/fuzz_checkpoint.cpp into fuzz/corpus/.

    python3 fuzz/make_corpus.py              # (re)writes fuzz/corpus/seed-*
    python3 fuzz/make_corpus.py --large DIR  # writes the large regression inputs to DIR

The outputs are committed; rerun this only to change the seeds. Every seed is a
tiny (< 4 KB) safetensors image: valid ones in each layout the loader knows
(LDM, diffusers, first_stage_model./vae. prefixes, every dtype, empty) and
invalid ones that stop at each check of the parser. Inputs the fuzzer found
(crash-*, regression-*) are kept beside them and are not touched here.
Standard library only, deterministic (no randomness, sorted keys where the
order does not matter).

The large inputs (up to a few MB, too big to commit or to mutate) are written
by scripts/fuzz.sh into build-fuzz/large/ and run once before fuzzing: they
replay findings that need more than the fuzzer's 16 KB inputs.
"""
import json
import os
import struct
import sys

DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def image(header_text, data=b"", length=None):
    """8-byte little-endian header length, header text, data section."""
    text = header_text.encode() if isinstance(header_text, str) else header_text
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def safetensors(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype, shape). Data bytes are a counting pattern."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in tensors:
        n = DTYPE_SIZE[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    if pad:
        text += " " * ((8 - len(text) % 8) % 8)
    return image(text, bytes(i % 251 for i in range(offset)))


def conv(name, cout, cin, k=1, dtype="F32"):
    return [(name + ".weight", dtype, [cout, cin, k, k]), (name + ".bias", dtype, [cout])]


def seeds():
    s = {}
    # ---- valid
    s["valid-empty"] = safetensors([])
    s["valid-ldm-minimal"] = safetensors(
        conv("encoder.conv_in", 2, 3) + [("encoder.norm_out.weight", "F32", [2])]
        + conv("encoder.conv_out", 2, 2) + conv("quant_conv", 2, 2),
        metadata={"format": "pt"})
    s["valid-ldm-blocks-f16"] = safetensors(
        conv("encoder.conv_in", 1, 3, dtype="F16")
        + conv("encoder.down.0.block.0.conv1", 1, 1, dtype="F16")
        + conv("encoder.down.0.block.1.nin_shortcut", 1, 1, dtype="F16")
        + conv("encoder.down.0.downsample.conv", 1, 1, dtype="F16")
        + conv("encoder.mid.attn_1.q", 1, 1, dtype="F16")
        + conv("encoder.mid.block_1.conv1", 1, 1, dtype="F16")
        + [("decoder.conv_in.weight", "F16", [1, 1, 1, 1])])
    s["valid-diffusers"] = safetensors(
        conv("encoder.conv_in", 1, 3)
        + conv("encoder.down_blocks.0.resnets.0.conv1", 1, 1)
        + conv("encoder.down_blocks.0.resnets.1.conv_shortcut", 1, 1)
        + conv("encoder.down_blocks.0.downsamplers.0.conv", 1, 1)
        + conv("encoder.mid_block.resnets.0.conv1", 1, 1)
        + conv("encoder.mid_block.resnets.1.conv_shortcut", 1, 1)
        + [("encoder.mid_block.attentions.0.group_norm.weight", "F32", [1])]
        + [("encoder.mid_block.attentions.0.to_q.weight", "F32", [1, 1])]
        + [("encoder.mid_block.attentions.0.key.weight", "F32", [1, 1])]
        + [("encoder.mid_block.attentions.0.to_v.weight", "F32", [1, 1])]
        + [("encoder.mid_block.attentions.0.to_out.0.weight", "F32", [1, 1])]
        + [("encoder.conv_norm_out.weight", "F32", [1])]
        + conv("quant_conv", 2, 2))
    s["valid-first-stage-model-bf16"] = safetensors(
        conv("first_stage_model.encoder.conv_in", 1, 3, dtype="BF16")
        + conv("first_stage_model.quant_conv", 2, 2, dtype="BF16")
        + [("model.diffusion_model.input_blocks.0.0.weight", "F16", [2, 2])]
        + [("cond_stage_model.transformer.x", "F32", [1])],
        metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    s["valid-vae-prefix-diffusers"] = safetensors(
        conv("vae.encoder.conv_in", 1, 3)
        + [("vae.encoder.mid_block.attentions.0.query.weight", "F32", [1, 1])]
        + [("vae.encoder.mid_block.attentions.0.proj_attn.weight", "F32", [1, 1])]
        + [("vae.encoder.down_blocks.1.resnets.0.norm1.weight", "F32", [1])])
    s["valid-all-dtypes"] = safetensors(
        [("t_" + d.lower(), d, [2]) for d in DTYPE_SIZE]
        + [("scalar", "F32", []), ("zero", "F32", [0, 3]), ("high_rank", "U8", [1] * 8)])
    s["valid-unpadded-whitespace"] = image(
        ' { "encoder.conv_in.weight" : { "dtype" : "F32" , "shape" : [ 1 ] , '
        '"data_offsets" : [ 0 , 4 ] } }\t\n', b"\0\0\x80\x3f")
    # ---- invalid: one per check of the parser / the key normaliser
    s["bad-short"] = b"\x10\0\0\0"
    s["bad-header-past-end"] = image('{"a":1}', length=4096)
    s["bad-header-huge"] = struct.pack("<Q", (1 << 63) + 5) + b"{}"
    s["bad-not-json"] = image('{"encoder.conv_in.weight": {"dtype": "F32",')
    s["bad-nul-in-header"] = image('{}\0{"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', b"\0" * 4)
    s["bad-array-header"] = image('[{"dtype":"F32"}]   ')
    s["bad-unknown-dtype"] = image('{"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}', b"\0" * 16)
    s["bad-negative-shape"] = image('{"w":{"dtype":"F32","shape":[-1,4],"data_offsets":[0,4]}}', b"\0" * 4)
    s["bad-shape-overflow"] = image(
        '{"w":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}')
    s["bad-too-many-dims"] = image('{"w":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}}', b"\0")
    s["bad-offsets-past-end"] = image('{"w":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}', b"\0" * 4)
    s["bad-offsets-reversed"] = image('{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}', b"\0" * 4)
    s["bad-span-mismatch"] = image('{"w":{"dtype":"F16","shape":[3],"data_offsets":[0,4]}}', b"\0" * 8)
    s["bad-metadata-value"] = image('{"__metadata__":{"format":1},"w":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}', b"\0")
    s["bad-escaped-names"] = image(
        '{"encoder.conv_in.weight\\u0000x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        '"\\ud83d\\ude00":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},'
        '"__metadata__":[]}', b"\0\0")
    # Parse fine, but normalize_vae_keys refuses them.
    s["keys-no-encoder"] = safetensors(conv("decoder.conv_in", 1, 4) + conv("post_quant_conv", 4, 4))
    s["keys-duplicate-canonical"] = safetensors(
        conv("encoder.conv_in", 1, 3)
        + [("encoder.mid_block.attentions.0.to_q.weight", "F32", [1, 1]),
           ("encoder.mid_block.attentions.0.query.weight", "F32", [1, 1])])
    return s


def large():
    s = {}
    # std::regex recursed once per digit here and overflowed the stack at
    # ~25k digits (ASan) / ~100k digits (-O2): checkpoint_keys.cpp now matches
    # without std::regex.
    digits = "1" * 1_000_000
    s["regression-long-digit-block"] = safetensors(
        [("encoder.conv_in.weight", "U8", [1]),
         ("encoder.down_blocks." + digits + ".resnets.0.conv1.weight", "U8", [1])])
    s["regression-long-digit-resnet"] = safetensors(
        [("vae.encoder.conv_in.weight", "U8", [1]),
         ("vae.encoder.down_blocks.0.resnets." + digits + ".conv_shortcut.weight", "U8", [1]),
         ("vae.encoder.down_blocks." + digits, "U8", [1])])
    # Many tensors: normalisation must stay linear-ish.
    s["large-many-diffusers-tensors"] = safetensors(
        [("first_stage_model.encoder.conv_in.weight", "U8", [1])]
        + [(f"first_stage_model.encoder.down_blocks.{i}.resnets.{j}.conv1.weight", "U8", [0])
           for i in range(200) for j in range(100)])
    # Deep JSON nesting must neither overflow the stack nor be accepted.
    s["large-deep-nesting"] = image('{"w":' + "[" * 200_000 + "]" * 200_000 + "}")
    # A long name and metadata value.
    s["large-long-names"] = safetensors(
        [("encoder.conv_in.weight", "U8", [1]), ("x" * 1_000_000, "U8", [1])],
        metadata={"k" * 100_000: "v" * 1_000_000})
    return s


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--large":
        os.makedirs(sys.argv[2], exist_ok=True)
        for name, data in sorted(large().items()):
            with open(os.path.join(sys.argv[2], name + ".safetensors"), "wb") as f:
                f.write(data)
        return
    if len(sys.argv) != 1:
        sys.exit("usage: make_corpus.py [--large DIR]")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith("seed-"):
            os.remove(os.path.join(out, name))
    for name, data in sorted(seeds().items()):
        assert len(data) < 4096, (name, len(data))
        with open(os.path.join(out, "seed-" + name + ".safetensors"), "wb") as f:
            f.write(data)
    print(f"wrote {len(seeds())} seeds to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
