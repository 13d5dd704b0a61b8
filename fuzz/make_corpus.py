#!/usr/bin/env python3
"""Writes the seed corpora of fuzz/fuzz_checkpoint.cpp (fuzz/corpus/) and of
fuzz/fuzz_latent_file.cpp (fuzz/corpus-latent/).

    python3 fuzz/make_corpus.py              # (re)writes fuzz/corpus/seed-* and fuzz/corpus-latent/seed-*
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


def npy(descr, shape, data, version=1, fortran=False, pad=True):
    """A NumPy file: magic, version, header length, the header dict, data."""
    text = "{'descr': '%s', 'fortran_order': %s, 'shape': (%s), }" % (
        descr, "True" if fortran else "False", ", ".join(str(v) for v in shape) + ("," if len(shape) == 1 else ""))
    prefix = 10 if version == 1 else 12
    if pad:
        text += " " * ((64 - (prefix + len(text) + 1) % 64) % 64)
    text += "\n"
    length = struct.pack("<H", len(text)) if version == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + length + text.encode() + data


def latent_seeds():
    """Seeds of fuzz_latent_file: ComfyUI .latent files, latentfilesink's
    .safetensors and .npy, and one invalid file per check of the reader."""
    s = {}
    f32 = lambda n: struct.pack("<%df" % n, *[(i % 7) - 3.0 for i in range(n)])  # noqa: E731
    f16 = lambda n: bytes(i % 251 for i in range(2 * n))  # noqa: E731
    marker = ("latent_format_version_0", "F32", [0])
    meta = {"frame_count": "2", "framerate": "30/1", "latent_format": "raw", "source_width": "16",
            "source_height": "8", "model": "vae.safetensors", "created_by": "gst-vae latentfilesink"}

    def st(tensors, metadata=None):
        """Like safetensors() but with the given data bytes per tensor."""
        header = {}
        if metadata is not None:
            header["__metadata__"] = metadata
        data = b""
        for name, dtype, shape, raw in tensors:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
            data += raw
        text = json.dumps(header, separators=(",", ":"))
        text += " " * ((8 - len(text) % 8) % 8)
        return image(text, data)

    # ---- valid
    s["valid-comfyui"] = st([marker + (b"",), ("latent_tensor", "F32", [2, 4, 1, 2], f32(16))])
    s["valid-comfyui-old-no-marker"] = st([("latent_tensor", "F32", [1, 4, 2, 2], f32(16))])
    s["valid-sink-metadata"] = st([marker + (b"",), ("latent_tensor", "F32", [2, 2, 1, 2], f32(8))], meta)
    s["valid-ranges"] = st([marker + (b"",), ("latent_tensor", "F32", [2, 1, 1, 1], f32(2))],
                           {"ranges": '[{"first_frame":0,"frames":1,"framerate":"30/1"},'
                                      '{"first_frame":1,"frames":1,"framerate":"25/1"}]'})
    s["valid-f16"] = st([("latent_tensor", "F16", [2, 4, 1, 1], f16(8))])
    s["valid-bf16"] = st([("latent_tensor", "BF16", [1, 4, 1, 2], f16(8))])
    s["valid-3d"] = st([("latent_tensor", "F32", [4, 1, 2], f32(8))])
    s["valid-zero-frames"] = st([("latent_tensor", "F32", [0, 4, 8, 8], b"")])
    s["valid-npy"] = npy("<f4", [2, 2, 1, 2], f32(8))
    s["valid-npy-f16"] = npy("<f2", [1, 4, 1, 1], f16(4))
    s["valid-npy-3d"] = npy("<f4", [2, 2, 2], f32(8))
    s["valid-npy-v2"] = npy("<f4", [1, 1, 1, 2], f32(2), version=2)
    s["valid-npy-unpadded"] = npy("<f4", [1, 1, 1, 1], f32(1), pad=False)
    # ---- invalid
    s["bad-npy-short-data"] = npy("<f4", [2, 2, 1, 2], f32(7))
    s["bad-npy-huge-shape"] = npy("<f4", [1000000000, 4, 10000, 10000], f32(16))
    s["bad-npy-frame-too-big"] = npy("<f4", [0, 4, 1000000, 1000000], b"")
    s["bad-npy-fortran"] = npy("<f4", [1, 1, 1, 2], f32(2), fortran=True)
    s["bad-npy-big-endian"] = npy(">f4", [1, 1, 1, 2], f32(2))
    s["bad-npy-5d"] = npy("<f4", [1, 1, 1, 1, 2], f32(2))
    s["bad-npy-version-9"] = b"\x93NUMPY\x09\x00" + npy("<f4", [1], f32(1))[8:]
    s["bad-npy-huge-header"] = b"\x93NUMPY\x02\x00\xf0\xff\xff\xff{'descr'"
    s["bad-npy-code"] = npy("<f4", [1], f32(1)).replace(b"'shape': (1,)", b"'shape': (__import__('os'),)")
    s["bad-latent-i32"] = st([("latent_tensor", "I32", [1, 1, 1, 2], f32(2))])
    s["bad-latent-2d"] = st([("latent_tensor", "F32", [2, 2], f32(4))])
    s["bad-latent-zero-channels"] = st([("latent_tensor", "F32", [2, 0, 1, 1], b"")])
    s["bad-latent-missing"] = st([("samples", "F32", [1, 1, 1, 1], f32(1))])
    s["bad-latent-huge-frame"] = st([("latent_tensor", "F32", [0, 65536, 65536, 4], b"")])
    s["bad-pickle"] = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."
    s["bad-zip"] = b"PK\x03\x04" + bytes(26)
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
    here = os.path.dirname(os.path.abspath(__file__))
    for folder, corpus in (("corpus", seeds()), ("corpus-latent", latent_seeds())):
        out = os.path.join(here, folder)
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):
            if name.startswith("seed-"):
                os.remove(os.path.join(out, name))
        for name, data in sorted(corpus.items()):
            assert len(data) < 4096, (name, len(data))
            ext = ".npy" if data.startswith(b"\x93NUMPY") else ".latent" if folder == "corpus-latent" else ".safetensors"
            with open(os.path.join(out, "seed-" + name + ext), "wb") as f:
                f.write(data)
        print(f"wrote {len(corpus)} seeds to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
