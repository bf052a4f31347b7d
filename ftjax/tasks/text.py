"""Text problems as an RL task: template -> prompt tokens; response tokens -> text -> verifier.

Dims: N response tokens.

`TextTask` is a `rollout.Task` over `data.Example`s. Its prompt stream visits the examples in a
fresh seeded permutation every epoch, so `prompts(start, count)` is a pure function of the index
(what makes runs resume exactly). `score` decodes the response, asks the verifier for a reward
and the final answer's character span, and maps the span onto the response tokens: FlowTracer's
sink.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ftjax import rundir
from ftjax.tasks import data, verifiers


@dataclasses.dataclass(frozen=True)
class TextTaskConfig:
    template: str = "plain"  # a key of data.TEMPLATES
    verifier: str = "math"  # a key of verifiers.VERIFIERS
    instruction: str = data.DEFAULT_INSTRUCTION
    preamble: str = ""  # text before every question, e.g. solved examples (`few_shot_preamble`)
    add_bos: bool = True  # prepend the tokenizer's BOS (templates that spell it out set False)
    shuffle_seed: int | None = 0  # None: every epoch in file order

    def __post_init__(self):
        if self.template not in data.TEMPLATES:
            raise ValueError(
                f"TextTaskConfig.template {self.template!r} is not one of {sorted(data.TEMPLATES)}"
            )
        if self.verifier not in verifiers.VERIFIERS:
            raise ValueError(
                f"TextTaskConfig.verifier {self.verifier!r} is not one of "
                f"{sorted(verifiers.VERIFIERS)}"
            )


def few_shot_preamble(shots: Sequence[data.Example], verifier: str) -> str:
    """Solved examples, each "question\nsolution\n<final answer>" and a blank line, the final
    answer written the way `verifier` reads it (GSM8K's `#### 72`, else `\\boxed{72}`)."""
    blocks = []
    for shot in shots:
        if not shot.solution:
            raise ValueError(f"{shot.source}: a few-shot example needs a worked solution")
        final = f"#### {shot.answer}" if verifier == "gsm8k" else f"\\boxed{{{shot.answer}}}"
        blocks.append(f"{shot.prompt.strip()}\n{shot.solution.strip()}\n{final}\n\n")
    return "".join(blocks)


def token_offsets(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) character range of each token in `tokenizer.decode(ids)`, by decoding growing
    prefixes (a token that decodes to nothing, like EOS, gets an empty range)."""
    offsets, previous = [], 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1]))
        offsets.append((previous, max(end, previous)))
        previous = max(end, previous)
    return offsets


def encode_prompts(
    examples: Sequence[data.Example], tokenizer, cfg: TextTaskConfig, max_tokens: int
) -> tuple[list[data.Example], list[list[int]], list[str]]:
    """(kept examples, their prompt ids, problems): an example whose templated prompt is over
    `max_tokens` tokens is left out and reported as "source: why"."""
    kept, ids, problems = [], [], []
    for example in examples:
        text = data.render(cfg.preamble + example.prompt, cfg.template, cfg.instruction)
        prompt = tokenizer.encode(text, add_bos=cfg.add_bos)
        if len(prompt) > max_tokens:
            problems.append(
                f"{example.source}: prompt has {len(prompt)} tokens, over the {max_tokens} "
                "prompt slots"
            )
            continue
        kept.append(example)
        ids.append(prompt)
    return kept, ids, problems


class TextTask:
    """Prompts and rewards for a list of text examples (see the module docstring)."""

    def __init__(
        self,
        examples: Sequence[data.Example],
        prompt_ids: Sequence[Sequence[int]],
        tokenizer,
        cfg: TextTaskConfig,
        *,
        stop_ids: Sequence[int] = (),
        pad_id: int = 0,
    ):
        """stop_ids: the token ids that end a response (the policy's EOS, end of turn, ...);
        pad_id: the id that fills prompt and response slots."""
        if not examples:
            raise ValueError("a TextTask needs at least one example")
        if len(examples) != len(prompt_ids):
            raise ValueError(f"{len(examples)} examples but {len(prompt_ids)} prompts")
        self.examples = list(examples)
        self.prompt_ids = [list(p) for p in prompt_ids]
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.stop_ids, self.pad_id = tuple(int(i) for i in stop_ids), int(pad_id)
        self._verify = verifiers.VERIFIERS[cfg.verifier]
        # score() is handed prompt ids; equal prompt ids mean the same question.
        self._answers = {tuple(p): e.answer for p, e in zip(self.prompt_ids, examples, strict=True)}

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """A digest of the examples and their prompt ids, in order: what a run trains on."""
        rows = zip(self.examples, self.prompt_ids, strict=True)
        return rundir.digest((e.prompt, e.answer, ids) for e, ids in rows)

    def example_index(self, i: int) -> int:
        """Which example stream position i shows: epoch i // n, in that epoch's permutation."""
        epoch, offset = divmod(i, len(self))
        if self.cfg.shuffle_seed is None:
            return offset
        order = np.random.default_rng([self.cfg.shuffle_seed, epoch]).permutation(len(self))
        return int(order[offset])

    def prompts(self, start: int, count: int) -> list[list[int]]:
        return [list(self.prompt_ids[self.example_index(i)]) for i in range(start, start + count)]

    def score(self, prompt: Sequence[int], response: Sequence[int]) -> tuple[float, list[bool]]:
        answer = self._answers.get(tuple(prompt))
        if answer is None:
            raise ValueError("score() got a prompt that is not one of this task's prompts")
        text = self.tokenizer.decode(list(response))
        verdict = self._verify(text, answer)
        if verdict.span is None:
            return verdict.reward, [False] * len(response)
        offsets = token_offsets(self.tokenizer, list(response))
        return verdict.reward, verifiers.char_span_to_token_mask(offsets, verdict.span)
