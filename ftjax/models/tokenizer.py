"""SentencePiece-style BPE tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata.

GGUF stores a SentencePiece vocabulary as parallel arrays: pieces, scores and token types (llama.cpp
numbering, below). Encoding follows SentencePiece's BPE model:
1. Spaces become the marker "▁" (with `add_space_prefix`, one "▁" is also put in front).
2. User-defined pieces ("\n\n", runs of spaces, "<table>") are cut out whole, leftmost-longest;
   so are control pieces, as Hugging Face tokenizers do, so that chat markup like
   `<start_of_turn>` maps to its id (SentencePiece itself would spell it out).
3. Each remaining stretch is split into characters and merged bottom-up: at every step the adjacent
   pair whose concatenation is the best-scoring piece merges (leftmost on ties). With `merges` in
   the metadata the merge list's rank orders the pairs instead of the scores.
4. A leftover character that is no piece is spelled as its UTF-8 bytes (`<0xNN>` pieces).
A literal "▁" in the text is indistinguishable from a space, so it decodes as " ".
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Mapping, Sequence
from typing import Any

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE_MARKER = "\u2581"  # "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """Encode text to ids and back with a SentencePiece vocabulary (pieces, scores, types)."""

    def __init__(
        self,
        pieces: Sequence[str],
        token_types: Sequence[int],
        *,
        scores: Sequence[float] | None = None,
        merges: Sequence[str] | None = None,
        bos_id: int,
        eos_id: int,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_space_prefix: bool = False,
    ):
        self.pieces = tuple(pieces)
        self.token_types = tuple(int(t) for t in token_types)
        self.vocab_size = len(self.pieces)
        if len(self.token_types) != self.vocab_size:
            raise ValueError(f"{len(self.token_types)} token types for {self.vocab_size} pieces")
        if scores is None and merges is None:
            raise ValueError("a SentencePiece vocabulary needs scores or merges")
        if scores is not None and len(scores) != self.vocab_size:
            raise ValueError(f"{len(scores)} scores for {self.vocab_size} pieces")
        for name, token_id in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("unk", unk_id)):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"{name}_id={token_id} is outside the vocabulary [0, {self.vocab_size})"
                )
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_space_prefix = add_space_prefix

        self._text_ids: dict[str, int] = {}  # pieces plain text maps to (merges produce them)
        self._whole_ids: dict[str, int] = {}  # pieces cut out of the raw text whole
        self._byte_ids: dict[int, int] = {}  # byte value -> id of its <0xNN> piece
        for i, (piece, kind) in enumerate(zip(self.pieces, self.token_types, strict=True)):
            if kind in (NORMAL, USER_DEFINED, UNUSED):
                self._text_ids[piece] = i
            if kind in (CONTROL, USER_DEFINED) and piece:
                # Matched after spaces become "▁": llama.cpp's converter respells user-defined
                # pieces with real spaces ("  "), SentencePiece matches them escaped ("▁▁").
                self._whole_ids[piece.replace(" ", SPACE_MARKER)] = i
            match = _BYTE_PIECE.fullmatch(piece)
            if kind == BYTE and match:
                self._byte_ids[int(match.group(1), 16)] = i
        self._byte_values = {i: byte for byte, i in self._byte_ids.items()}
        if merges is not None:
            pairs = (tuple(merge.split(" ")) for merge in merges)
            self._pair_rank = {pair: rank for rank, pair in enumerate(pairs) if len(pair) == 2}
            self._piece_score = None
        else:
            self._pair_rank = None
            self._piece_score = {piece: float(scores[i]) for piece, i in self._text_ids.items()}
        # Longest first, so the regex alternation prefers the longest piece at each position.
        longest_first = sorted(self._whole_ids, key=len, reverse=True)
        alternation = "|".join(re.escape(piece) for piece in longest_first)
        self._whole_pattern = re.compile(alternation) if longest_first else None

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file's metadata describes (`tokenizer.ggml.model` = "llama")."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "llama":
            raise ValueError(
                f"unsupported tokenizer.ggml.model={model!r}; only 'llama' (SentencePiece) is "
                "implemented"
            )
        if "tokenizer.ggml.precompiled_charsmap" in metadata:
            raise ValueError(
                "tokenizer.ggml.precompiled_charsmap (a SentencePiece normaliser) is "
                "not implemented"
            )
        for key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
        ):
            if key not in metadata:
                raise ValueError(f"GGUF metadata lacks {key!r}, needed for the tokenizer")
        return cls(
            metadata["tokenizer.ggml.tokens"],
            metadata["tokenizer.ggml.token_type"],
            scores=metadata.get("tokenizer.ggml.scores"),
            merges=metadata.get("tokenizer.ggml.merges"),
            bos_id=int(metadata["tokenizer.ggml.bos_token_id"]),
            eos_id=int(metadata["tokenizer.ggml.eos_token_id"]),
            pad_id=_optional_int(metadata.get("tokenizer.ggml.padding_token_id")),
            unk_id=_optional_int(metadata.get("tokenizer.ggml.unknown_token_id")),
            add_space_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
        )

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with the BOS id first when `add_bos`."""
        ids = [self.bos_id] if add_bos else []
        text = text.replace(" ", SPACE_MARKER)
        if self.add_space_prefix:
            text = SPACE_MARKER + text
        start = 0
        if self._whole_pattern is not None:
            for match in self._whole_pattern.finditer(text):
                ids += self._encode_plain(text[start : match.start()])
                ids.append(self._whole_ids[match.group()])
                start = match.end()
        ids += self._encode_plain(text[start:])
        return ids

    def decode(self, ids: Sequence[int], skip_control: bool = True) -> str:
        """Text of `ids`; control pieces (BOS, EOS, turn markers) vanish unless `skip_control`
        is False, as in SentencePiece. Byte pieces that form no valid UTF-8 become U+FFFD."""
        out = bytearray()
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})"
                )
            kind = self.token_types[token_id]
            if token_id in self._byte_values:
                out.append(self._byte_values[token_id])
            elif kind != CONTROL or not skip_control:
                out += self.pieces[token_id].replace(SPACE_MARKER, " ").encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of space-escaped text that holds no whole-matched piece."""
        ids = []
        for piece in self._merge(list(text)) if text else ():
            token_id = self._text_ids.get(piece)
            if token_id is not None:
                ids.append(token_id)
            else:
                ids += [self._byte_id(byte, piece) for byte in piece.encode("utf-8")]
        return ids

    def _byte_id(self, byte: int, piece: str) -> int:
        token_id = self._byte_ids.get(byte, self.unk_id)
        if token_id is None:
            raise ValueError(
                f"{piece!r} is not in the vocabulary, which has neither <0x{byte:02X}>"
                " nor an unknown token"
            )
        return token_id

    def _pair_priority(self, left: str, right: str) -> float | None:
        """Lower merges first; None when the pair never merges."""
        if self._pair_rank is not None:
            return self._pair_rank.get((left, right))
        score = self._piece_score.get(left + right)
        return None if score is None else -score

    def _merge(self, symbols: list[str]) -> list[str]:
        """BPE over a doubly linked list of symbols with a heap of candidate pairs: O(n log n).

        A heap entry is stale once either side has merged since it was pushed: a live symbol only
        grows and a merged-away one becomes "", so comparing the stored strings detects it."""
        count = len(symbols)
        prev = list(range(-1, count - 1))
        nxt = list(range(1, count + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, str, str]] = []

        def push(left: int) -> None:
            if left == -1 or nxt[left] == -1:
                return
            right = nxt[left]
            priority = self._pair_priority(symbols[left], symbols[right])
            if priority is not None:
                heapq.heappush(heap, (priority, left, symbols[left], symbols[right]))

        for i in range(count - 1):
            push(i)
        while heap:
            _, left, left_piece, right_piece = heapq.heappop(heap)
            right = nxt[left]
            if right == -1 or symbols[left] != left_piece or symbols[right] != right_piece:
                continue
            symbols[left], symbols[right] = left_piece + right_piece, ""  # "" marks it deleted
            nxt[left] = nxt[right]
            if nxt[right] != -1:
                prev[nxt[right]] = left
            push(prev[left])
            push(left)
        out, i = [], 0
        while i != -1:
            out.append(symbols[i])
            i = nxt[i]
        return out


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
