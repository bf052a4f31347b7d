"""From a data file and a pretrained policy to a `TextTask`: template, verifier, few-shot
examples and the ids that end a response.

`PromptConfig` is what a user sets on the command line (`--prompt.template`, `--prompt.shots`);
`build_task` resolves it against the policy (its family, whether it ships a chat template, its
tokenizer) and the data preset, and reports every row it leaves out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ftjax.models import pretrained
from ftjax.tasks import data, text


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How problems become prompts and responses become rewards."""

    template: str = "auto"  # auto: the family's chat markup if the checkpoint ships one, else plain
    verifier: str = "auto"  # auto: gsm8k for the gsm8k preset, else math (math-verify)
    instruction: str = data.DEFAULT_INSTRUCTION
    # Few-shot (for base models): the first `shots` rows of `shots_path` (same preset as the data;
    # in math_rl by default the training file, whose first rows are then not trained on), solved,
    # before every question; the instruction is then left out and a blank line ends a response.
    shots: int = 0
    shots_path: str | None = None

    def __post_init__(self):
        if self.shots < 0:
            raise ValueError(f"PromptConfig.shots must be >= 0, got {self.shots}")

    def load_shots(self, data_cfg: data.DataConfig, default_path: str | None = None):
        """The few-shot examples: the first `shots` rows of `shots_path` (or `default_path`)."""
        if not self.shots:
            return []
        path = self.shots_path or default_path
        if path is None:
            raise ValueError("--prompt.shots needs --prompt.shots_path (a file of solved problems)")
        cfg = dataclasses.replace(data_cfg, path=path, limit=self.shots, on_bad_row="error")
        shots, _ = data.load(cfg)
        if len(shots) < self.shots:
            raise ValueError(
                f"{path} has {len(shots)} rows, fewer than --prompt.shots {self.shots}"
            )
        return shots

    def resolve(self, policy: pretrained.Pretrained, preset: str | None, shots=()):
        """The TextTaskConfig this means for `policy`, a data preset and few-shot examples."""
        template = self.template
        if template == "auto":
            template = policy.family if policy.chat_template else "plain"
        verifier = self.verifier
        if verifier == "auto":
            verifier = "gsm8k" if preset == "gsm8k" else "math"
        return text.TextTaskConfig(
            template=template,
            verifier=verifier,
            instruction="" if shots else self.instruction,
            preamble=text.few_shot_preamble(shots, verifier),
            add_bos=template != "llama",  # the llama markup writes <|begin_of_text|> itself
        )


def stop_ids(policy: pretrained.Pretrained, cfg: text.TextTaskConfig) -> tuple[int, ...]:
    """The policy's EOS ids, and with few-shot prompts the blank line that ends a shot."""
    ids = policy.stop_ids()
    blank = policy.tokenizer.encode("\n\n", add_bos=False)
    if cfg.preamble and len(blank) == 1:
        ids = tuple(sorted({*ids, blank[0]}))
    return ids


def pad_id(policy: pretrained.Pretrained) -> int:
    pad = policy.model.cfg.pad_token_id
    return 0 if pad is None else int(pad)


def build_task(
    policy: pretrained.Pretrained,
    data_cfg: data.DataConfig,
    prompt_cfg: PromptConfig,
    prompt_len: int,
    shots: Sequence[data.Example] = (),
) -> tuple[text.TextTask, list[str]]:
    """The task over a data file's rows, less any that are `shots`; problems lists the rows left
    out (unreadable, or prompts over `prompt_len` tokens) as "source: why"."""
    examples, problems = data.load(data_cfg)
    shown = {shot.source for shot in shots}
    examples = [e for e in examples if e.source not in shown]
    cfg = prompt_cfg.resolve(policy, data_cfg.preset, shots)
    kept, ids, too_long = text.encode_prompts(examples, policy.tokenizer, cfg, prompt_len)
    problems += too_long
    if too_long and data_cfg.on_bad_row == "error":
        raise ValueError(too_long[0])
    if not kept:
        raise ValueError(f"no usable problems in {data_cfg.path}: {problems[:3]}")
    task = text.TextTask(
        kept, ids, policy.tokenizer, cfg, stop_ids=stop_ids(policy, cfg), pad_id=pad_id(policy)
    )
    return task, problems
