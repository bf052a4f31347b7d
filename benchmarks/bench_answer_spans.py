"""Host time to score one rollout batch of a text task: answer spans onto tokens by growing-prefix
decoding (`text.prefix_token_offsets`, O(N^2) decode work per response, what `TextTask.score` did
before) vs the windowed decoding it does now (`text.token_offsets`, linear).

The tokenizer is the tests' byte-level BPE (`experiments.tiny_model`) as an `HFTokenizer`; each
response is a worked solution repeated to N tokens, ending in "#### 42" (GSM8K's verifier finds
the answer, so every response's span is mapped). The two mappings must agree, and do.
Usage: python -m benchmarks.bench_answer_spans [--lengths 256,1024,4096] [--batch 16]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

from experiments import synthetic_math, tiny_model
from ftjax.models import pretrained
from ftjax.tasks import data
from ftjax.tasks import text as text_task


def setup(directory: pathlib.Path, problems: int = 64):
    """(a text task over synthetic problems, its tokenizer)."""
    rows = synthetic_math.rows(0, problems, seed=0)
    texts = [row["question"] for row in rows] + [row["answer"] for row in rows]
    tiny_model.write_tokenizer(directory, texts)
    tok = pretrained.HFTokenizer(directory)
    examples = [data.Example(r["question"], "42", source=f"row {i}") for i, r in enumerate(rows)]
    cfg = text_task.TextTaskConfig(template="plain", verifier="gsm8k", instruction="")
    kept, ids, _ = text_task.encode_prompts(examples, tok, cfg, max_tokens=512)
    return text_task.TextTask(kept, ids, tok, cfg), tok


def responses(tok, tokens: int, batch: int) -> list[list[int]]:
    """`batch` responses of `tokens` tokens: worked solutions, then the final answer."""
    rows = synthetic_math.rows(0, batch, seed=1)
    out = []
    for row in rows:
        body = tok.encode(row["answer"].rpartition("####")[0] + "\n", add_bos=False)
        ending = tok.encode("#### 42", add_bos=False)
        ids = (body * (tokens // len(body) + 1))[: tokens - len(ending)] + ending
        out.append(ids)
    return out


def seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(tokens: int, batch: int, repeats: int = 1, old: bool = True) -> dict[str, float]:
    """Seconds to score one batch now, and (with `old`) with growing-prefix offsets."""
    with tempfile.TemporaryDirectory() as directory:
        task, tok = setup(pathlib.Path(directory))
        prompts = task.prompts(0, batch)
        rows = responses(tok, tokens, batch)
        new_scores = task.score_batch(prompts, rows)
        result = {"new_s": seconds(lambda: task.score_batch(prompts, rows), repeats)}
        if old:
            fast = text_task.token_offsets
            text_task.token_offsets = text_task.prefix_token_offsets
            try:
                old_scores = task.score_batch(prompts, rows)
                result["old_s"] = seconds(lambda: task.score_batch(prompts, rows), repeats)
            finally:
                text_task.token_offsets = fast
            if old_scores != new_scores:
                raise AssertionError("the two offset mappings disagree")
        return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--old_up_to", type=int, default=4096, help="skip the O(N^2) run above")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    print("| tokens per response | batch | prefix decoding (s) | windowed (s) | ratio |")
    print("|---|---|---|---|---|")
    for tokens in (int(n) for n in args.lengths.split(",")):
        got = measure(tokens, args.batch, args.repeats, old=tokens <= args.old_up_to)
        old = got.get("old_s")
        shown = "-" if old is None else f"{old:.3f}"
        ratio = "-" if old is None else f"{old / got['new_s']:.1f}x"
        print(f"| {tokens} | {args.batch} | {shown} | {got['new_s']:.3f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
