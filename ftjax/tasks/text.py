"""Text problems as an RL task: template -> prompt tokens; response tokens -> text -> verifier.

Dims: N response tokens.

`TextTask` is a `rollout.Task` over `data.Example`s. Its prompt stream visits the examples in a
fresh seeded permutation every epoch, so `prompts(start, count)` is a pure function of the index
(what makes runs resume exactly). `score_batch` decodes the responses, asks the verifier (or the
user's reward functions, `tasks.rewards`) for rewards and each final answer's character span,
and maps the span onto the response tokens (`token_offsets`, linear in the length): FlowTracer's
sink.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ftjax import rundir
from ftjax.models.chat_template import ChatTemplate
from ftjax.tasks import data, rewards, verifiers

CHECKPOINT = "checkpoint"  # the template name that means "render `chat_template`"


@dataclasses.dataclass(frozen=True)
class TextTaskConfig:
    template: str = "plain"  # a key of data.TEMPLATES, or CHECKPOINT
    chat_template: ChatTemplate | None = None  # the checkpoint's own, with template CHECKPOINT
    system: str | None = None  # every prompt's system message; None: each row's own; "": none
    verifier: str = "math"  # a key of verifiers.VERIFIERS
    instruction: str = data.DEFAULT_INSTRUCTION
    preamble: str = ""  # text before every question, e.g. solved examples (`few_shot_preamble`)
    add_bos: bool = True  # prepend the tokenizer's BOS (templates that spell it out set False)
    shuffle_seed: int | None = 0  # None: every epoch in file order

    def __post_init__(self):
        if self.template not in (*data.TEMPLATES, CHECKPOINT):
            raise ValueError(
                f"TextTaskConfig.template {self.template!r} is not one of "
                f"{sorted((*data.TEMPLATES, CHECKPOINT))}"
            )
        if (self.template == CHECKPOINT) != (self.chat_template is not None):
            raise ValueError(
                f"TextTaskConfig.template {self.template!r} needs chat_template set exactly "
                f"when it is {CHECKPOINT!r}"
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


def prefix_token_offsets(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) character range of each token in `tokenizer.decode(ids)`, by decoding growing
    prefixes: token i ends where `decode(ids[: i + 1])` ends (a token that decodes to nothing,
    like EOS, gets an empty range). Obviously right and O(N^2): `token_offsets` is the fast one."""
    offsets, previous = [], 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1]))
        offsets.append((previous, max(end, previous)))
        previous = max(end, previous)
    return offsets


# token_offsets decodes windows of at most OFFSET_WINDOW tokens after OFFSET_CONTEXT tokens
# of context, so its cost is linear in the response length.
OFFSET_CONTEXT, OFFSET_WINDOW = 4, 32


def token_offsets(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """`prefix_token_offsets` in linear time: the length of `decode(ids[: i + 1])` is tracked
    from a short window, `len(decode(ids[:a])) + len(decode(ids[s : i + 1])) -
    len(decode(ids[s:a]))`, where a (the anchor) is a token boundary the text is clean at (it
    does not end in U+FFFD, so no character is half-decoded there) and s is a few tokens of
    context before it (a decoder that strips the first token's leading space strips it from
    both window decodes alike). A character split over several tokens counts from the token
    that holds its first byte, as growing prefixes count it (a lossy UTF-8 decode shows the
    unfinished character as one U+FFFD).

    Exact for decoders where a token's text depends only on the bytes before it (byte-level BPE,
    SentencePiece pieces with byte fallback, `models.tokenizer.Tokenizer`); the end of the last
    token is checked against the whole decode, and a decoder that breaks the rule there gets
    `prefix_token_offsets` (the same result, slower)."""
    ids = list(ids)
    offsets, previous = [], 0
    # Characters in decode(ids[:anchor]) (base) and in decode(ids[start:anchor]) (context).
    start = base = context = 0
    for i in range(len(ids)):
        window = tokenizer.decode(ids[start : i + 1])
        end = base + len(window) - context
        offsets.append((previous, max(end, previous)))
        previous = max(end, previous)
        if i + 1 - start >= OFFSET_WINDOW and not window.endswith("\ufffd"):
            anchor, base = i + 1, end
            start = max(0, anchor - OFFSET_CONTEXT)
            context = len(tokenizer.decode(ids[start:anchor]))
    if ids and end != len(tokenizer.decode(ids)):
        return prefix_token_offsets(tokenizer, ids)
    return offsets


def prompt_text(example: data.Example, cfg: TextTaskConfig) -> str:
    """The text the policy continues: the system message (`cfg.system`, else the row's own), then
    one user turn (preamble, question, instruction), then the assistant turn's opener; through
    the checkpoint's chat template, or a hand-written one."""
    system = example.system if cfg.system is None else cfg.system
    question = cfg.preamble + example.prompt
    if cfg.chat_template is None:
        return data.render(question, cfg.template, cfg.instruction, system)
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages.append({"role": "user", "content": data.user_content(question, cfg.instruction)})
    return cfg.chat_template.render(messages, add_generation_prompt=True)


def encode_prompts(
    examples: Sequence[data.Example], tokenizer, cfg: TextTaskConfig, max_tokens: int
) -> tuple[list[data.Example], list[list[int]], list[str]]:
    """(kept examples, their prompt ids, problems): an example whose templated prompt is over
    `max_tokens` tokens is left out and reported as "source: why"."""
    kept, ids, problems = [], [], []
    for example in examples:
        text = prompt_text(example, cfg)
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
        reward: rewards.RewardConfig | None = None,
    ):
        """stop_ids: the token ids that end a response (the policy's EOS, end of turn, ...);
        pad_id: the id that fills prompt and response slots; reward: reward functions of the
        user's that replace the verifier's reward (none: the verifier's)."""
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
        self.rewards = None
        if reward is not None and reward.functions:
            self.rewards = rewards.Rewards(reward, cfg.verifier)
        # score() is handed prompt ids; equal prompt ids mean the same question.
        self._examples = {tuple(p): e for p, e in zip(self.prompt_ids, examples, strict=True)}

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """A digest of the examples and their prompt ids, in order: what a run trains on."""
        rows = zip(self.examples, self.prompt_ids, strict=True)
        parts = [(e.prompt, e.answer, ids) for e, ids in rows]
        if self.rewards is not None:  # so is every reward file's content
            parts.append(self.rewards.fingerprint())
        return rundir.digest(parts)

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
        return self.score_batch([prompt], [response])[0]

    def score_batch(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
    ) -> list[tuple[float, list[bool]]]:
        """(reward, answer-span mask over the response tokens) of each (prompt, response); the
        reward functions see the whole batch at once."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        examples = [self._example(p) for p in prompts]
        responses = [[int(t) for t in r] for r in responses]
        texts = [self.tokenizer.decode(r) for r in responses]
        if self.rewards is None:
            verdicts = [self._verify(t, e.answer) for t, e in zip(texts, examples, strict=True)]
            values, spans = [v.reward for v in verdicts], [v.span for v in verdicts]
        else:
            batch = rewards.RewardBatch(
                prompts=[e.prompt for e in examples],
                completions=texts,
                completion_ids=responses,
                fields=rewards.row_fields([e.row for e in examples], [e.answer for e in examples]),
                sources=[e.source for e in examples],
            )
            scored = self.rewards(batch)
            values, spans = scored.rewards, scored.spans
        return [
            (value, self._span_mask(response, span))
            for value, response, span in zip(values, responses, spans, strict=True)
        ]

    def _example(self, prompt: Sequence[int]) -> data.Example:
        example = self._examples.get(tuple(int(t) for t in prompt))
        if example is None:
            raise ValueError("score() got a prompt that is not one of this task's prompts")
        return example

    def _span_mask(self, response: list[int], span: tuple[int, int] | None) -> list[bool]:
        if span is None:
            return [False] * len(response)
        return verifiers.char_span_to_token_mask(token_offsets(self.tokenizer, response), span)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each token's characters in the decoded text (`token_offsets`): they join to it."""
        ids = [int(t) for t in ids]
        text = self.tokenizer.decode(ids)
        return [text[start:end] for start, end in token_offsets(self.tokenizer, ids)]
