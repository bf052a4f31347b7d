"""A tiny random HF checkpoint directory (Llama, 3 layers, hidden 32) with a byte-level BPE
tokenizer trained on the synthetic math problems: the model the test suite's `math_rl` runs use,
and the README's reward-function example. Seconds on CPU; needs `tokenizers` (the math extra).

    python -m experiments.synthetic_math                  # data/arith/{train,test}.jsonl
    python -m experiments.tiny_model --out runs/tiny_model
    python -m experiments.math_rl --model runs/tiny_model --eval.enabled false ...

The weights are random, so it writes random text: it shows the machinery run, not learning.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
from flax import nnx

from experiments import common
from ftjax.models import config as model_config
from ftjax.models import hf
from ftjax.models.transformer import Transformer
from ftjax.tasks import data

SPECIALS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2: BOS, EOS, padding


@dataclasses.dataclass(frozen=True)
class TinyModelConfig:
    out: str = "runs/tiny_model"  # the checkpoint directory to write
    data: str = "data/arith/train.jsonl"  # the tokenizer learns the "question" field's text
    vocab_size: int = 1000  # the BPE trainer's target (fewer when the text has fewer merges)
    seed: int = 0  # the random weights'

    def __post_init__(self):
        if self.vocab_size < 256 + len(SPECIALS):
            raise ValueError(
                f"TinyModelConfig.vocab_size must cover the 256 bytes and {len(SPECIALS)} "
                f"special tokens, got {self.vocab_size}"
            )


def hf_config(vocab_size: int) -> dict:
    """The checkpoint's config.json fields (transformers' LlamaConfig keywords)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


def write_tokenizer(directory: pathlib.Path, texts: Sequence[str], vocab_size: int = 1000) -> int:
    """tokenizer.json (byte-level BPE trained on `texts`) and tokenizer_config.json; returns the
    vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    names = dict(zip(("bos_token", "eos_token", "pad_token"), SPECIALS, strict=True))
    (directory / "tokenizer_config.json").write_text(json.dumps(names))
    return tok.get_vocab_size()


def write(
    directory: str | pathlib.Path, texts: Sequence[str], vocab_size: int = 1000, seed: int = 0
) -> pathlib.Path:
    """The whole checkpoint directory: tokenizer, config.json and random model.safetensors."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    config = {"model_type": "llama", **hf_config(write_tokenizer(directory, texts, vocab_size))}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model = Transformer(model_config.from_hf(config), rngs=nnx.Rngs(seed))
    tensors = {k: np.ascontiguousarray(v) for k, v in hf.to_hf_tensors(model).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "np"})
    return directory


def questions(path: str | pathlib.Path) -> list[str]:
    """The "question" fields of a GSM8K-layout JSONL file, and the default instruction."""
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["question"] for line in lines if line.strip()] + [
        data.DEFAULT_INSTRUCTION
    ]


def main(argv: list[str]) -> pathlib.Path:
    cfg = common.parse(TinyModelConfig(), argv)
    if not pathlib.Path(cfg.data).is_file():
        raise ValueError(f"{cfg.data} does not exist: run python -m experiments.synthetic_math")
    out = write(cfg.out, questions(cfg.data), cfg.vocab_size, cfg.seed)
    print(f"wrote a tiny random Llama checkpoint to {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
