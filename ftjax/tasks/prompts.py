"""From a data file and a pretrained policy to a `TextTask`: template, verifier, few-shot
examples and the ids that end a response.

`PromptConfig` is what a user sets on the command line (`--prompt.template`, `--prompt.shots`);
`build_task` resolves it against the policy (its own chat template if it ships one, its family,
its tokenizer) and the data preset, and reports every row it leaves out.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from ftjax.models import pretrained
from ftjax.tasks import data, rewards, text


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How problems become prompts and responses become rewards."""

    # auto: the checkpoint's own chat template if it ships one, else plain; checkpoint: that
    # template (an error without one); plain or a family (llama, qwen2, qwen3, gemma3): our
    # hand-written markup, for checkpoints without a template.
    template: str = "auto"
    verifier: str = "auto"  # auto: gsm8k for the gsm8k preset, else math (math-verify)
    instruction: str = data.DEFAULT_INSTRUCTION  # said after each question (without shots)
    # Few-shot (for base models): the first `shots` rows of `shots_path` (same preset as the data;
    # in math_rl by default the training file, whose first rows are then not trained on), solved,
    # before every question; the instruction is then left out and a blank line ends a response.
    shots: int = 0
    shots_path: str | None = None
    shots_split: str | None = None  # the split of shots_path, when it is a DatasetDict directory
    system: str | None = None  # a system message for every prompt; None: each row's own; "": none
    # Extra variables for the checkpoint's template, "name=value" (JSON values, else text), e.g.
    # enable_thinking=false, or date_string=26 Jul 2024 for a template that would write today's
    # date (which would change the prompts from day to day).
    template_vars: tuple[str, ...] = ()

    def __post_init__(self):
        if self.shots < 0:
            raise ValueError(f"PromptConfig.shots must be >= 0, got {self.shots}")
        known = ("auto", text.CHECKPOINT, *data.TEMPLATES)
        if self.template not in known:
            raise ValueError(f"PromptConfig.template {self.template!r} is not one of {known}")
        self.variables()  # a malformed entry fails here, before any work

    def variables(self) -> dict[str, object]:
        """`template_vars` as name -> value."""
        values = {}
        for entry in self.template_vars:
            name, marker, raw = entry.partition("=")
            if not marker or not name.strip().isidentifier():
                raise ValueError(f"--prompt.template_vars entry {entry!r} is not name=value")
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            values[name.strip()] = value
        return values

    def load_shots(self, data_cfg: data.DataConfig, default_path: str | None = None):
        """The few-shot examples: the first `shots` rows of `shots_path` (of `shots_split`), or
        of `default_path`; a `default_path` equal to `data_cfg.path` means data_cfg's own rows
        (its file, directory split or data_files)."""
        if not self.shots:
            return []
        if self.shots_path is not None:
            source = dataclasses.replace(
                data_cfg, path=self.shots_path, data_files=(), split=self.shots_split
            )
        elif default_path is None:
            raise ValueError("--prompt.shots needs --prompt.shots_path (a file of solved problems)")
        elif default_path == data_cfg.path:
            source = data_cfg
        else:
            source = dataclasses.replace(data_cfg, path=default_path, data_files=(), split=None)
        cfg = dataclasses.replace(source, limit=self.shots, on_bad_row="error")
        shots, _ = data.load(cfg)
        if len(shots) < self.shots:
            raise ValueError(
                f"{cfg.label} has {len(shots)} rows, fewer than --prompt.shots {self.shots}"
            )
        return shots

    def resolve(self, policy: pretrained.Pretrained, preset: str | None, shots=()):
        """The TextTaskConfig this means for `policy`, a data preset and few-shot examples."""
        template = self.template
        if template == "auto":
            template = text.CHECKPOINT if policy.chat_template is not None else "plain"
        chat = None
        if template == text.CHECKPOINT:
            if policy.chat_template is None:
                raise ValueError(
                    "--prompt.template checkpoint: this checkpoint ships no chat template (no "
                    "chat_template.jinja, no chat_template in tokenizer_config.json); use plain "
                    f"or one of {sorted(data.TEMPLATES)}"
                )
            chat = policy.chat_template.with_variables(**self.variables())
        elif self.template_vars:
            raise ValueError(
                f"--prompt.template_vars only apply to the checkpoint's own template, not to the "
                f"hand-written {template!r}"
            )
        verifier = self.verifier
        if verifier == "auto":
            verifier = "gsm8k" if preset == "gsm8k" else "math"
        return text.TextTaskConfig(
            template=template,
            chat_template=chat,
            system=self.system,
            verifier=verifier,
            instruction="" if shots else self.instruction,
            preamble=text.few_shot_preamble(shots, verifier),
            # A chat template writes BOS itself when it wants one (as transformers tokenizes
            # it); so does the llama markup.
            add_bos=template not in ("llama", text.CHECKPOINT),
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
    reward: rewards.RewardConfig | None = None,
) -> tuple[text.TextTask, list[str]]:
    """The task over a data file's rows, less any that are `shots`; problems lists the rows left
    out (unreadable, or prompts over `prompt_len` tokens) as "source: why". `reward`: the user's
    reward functions (none: the verifier's reward)."""
    examples, problems = data.load(data_cfg)
    shown = {shot.source for shot in shots}
    examples = [e for e in examples if e.source not in shown]
    cfg = prompt_cfg.resolve(policy, data_cfg.preset, shots)
    kept, ids, too_long = text.encode_prompts(examples, policy.tokenizer, cfg, prompt_len)
    problems += too_long
    if too_long and data_cfg.on_bad_row == "error":
        raise ValueError(too_long[0])
    if not kept:
        raise ValueError(f"no usable problems in {data_cfg.label}: {problems[:3]}")
    task = text.TextTask(
        kept,
        ids,
        policy.tokenizer,
        cfg,
        stop_ids=stop_ids(policy, cfg),
        pad_id=pad_id(policy),
        reward=reward,
    )
    return task, problems
