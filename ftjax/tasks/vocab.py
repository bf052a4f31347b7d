"""A character-level vocabulary shared by the synthetic tasks: one token per character.

Ids 0, 1, 2 are <pad>, <bos>, <eos>; then digits, lowercase letters and the symbols the tasks
write. Prompts start with <bos>; responses end with <eos>.
"""

from __future__ import annotations

import dataclasses

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyz=+-*/;?>()|,:"


@dataclasses.dataclass(frozen=True)
class Vocab:
    characters: str = CHARACTERS

    def __post_init__(self):
        if len(set(self.characters)) != len(self.characters):
            raise ValueError(f"vocabulary characters repeat: {self.characters!r}")

    @property
    def size(self) -> int:
        return len(SPECIALS) + len(self.characters)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no <bos>/<eos>); unknown characters are a ValueError."""
        ids = []
        for position, char in enumerate(text):
            index = self.characters.find(char)
            if index < 0:
                raise ValueError(
                    f"character {char!r} at position {position} of {text!r} is not "
                    f"in the task vocabulary {self.characters!r}"
                )
            ids.append(len(SPECIALS) + index)
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`; specials are dropped, decoding stops at the first <eos>."""
        chars = []
        for token in ids:
            token = int(token)
            if token == EOS:
                break
            if not 0 <= token < self.size:
                raise ValueError(
                    f"token id {token} is outside the task vocabulary (size {self.size})"
                )
            if token >= len(SPECIALS):
                chars.append(self.characters[token - len(SPECIALS)])
        return "".join(chars)

    def token_strings(self, ids) -> list[str]:
        """One display string per id (specials by name), for pictures and debugging."""
        return [
            SPECIALS[t] if t < len(SPECIALS) else self.characters[t - len(SPECIALS)]
            for t in (int(i) for i in ids)
        ]


VOCAB = Vocab()
