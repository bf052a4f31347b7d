"""Pictures of credit: per-token throughput as HTML and PNG, backbone arc diagrams, learning curves.

Dims: T tokens, K edges. Inputs are plain Python/NumPy; every writer creates parent directories,
returns the path it wrote and closes its figure. Figures are built on `matplotlib.figure.Figure`
(no pyplot state, no display needed); `*_figure` functions return them for inspection.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import math
import pathlib

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Arc, Rectangle

DPI = 110
WHITE, ORANGE = np.array([255.0, 255.0, 255.0]), np.array([255.0, 140.0, 0.0])
# HTML and PNG share one scale so a colour means the same tau / max tau (outside the answer) in
# both.
TAU_CMAP = LinearSegmentedColormap.from_list("tau", [WHITE / 255, ORANGE / 255])
ESSENTIAL_BLUE, ANSWER_GREEN, SOURCE_GREEN, SINK_RED = "#0645ad", "#2a9d2a", "#1b9e77", "#d62728"
EDGE_PURPLE, DEAD_END_RED = "#5a3d8a", "#b03a2e"
ANSWER_BOX = dict(fill=False, ec=ANSWER_GREEN, lw=2, ls="--")


@dataclasses.dataclass(frozen=True)
class TokenSample:
    """One response to show: its tokens and the per-token credit signals."""

    title: str
    prompt_tokens: list[str]
    response_tokens: list[str]
    throughput: list[float]  # FlowTracer tau per response token (>= 0)
    selected: list[bool]  # gamma > 1: up-weighted by the credit variant
    answer: list[bool]  # answer span (the flow sink)
    essential: list[bool] | None = None  # ground-truth labels when the task has them
    reward: float | None = None
    gamma: list[float] | None = None  # the credit's weight per response token, shown on hover
    # Tokens of work the answer does not depend on (a dead-end chain), when the task knows
    dead_end: list[bool] | None = None

    def __post_init__(self):
        T = len(self.response_tokens)
        fields = {"throughput": self.throughput, "selected": self.selected, "answer": self.answer}
        if self.essential is not None:
            fields["essential"] = self.essential
        if self.dead_end is not None:
            fields["dead_end"] = self.dead_end
        if self.gamma is not None:
            fields["gamma"] = self.gamma
        for name, values in fields.items():
            if len(values) != T:
                raise ValueError(
                    f"sample {self.title!r}: {name} has {len(values)} entries but there are "
                    f"{T} response tokens"
                )
        tau_T = np.asarray(self.throughput, dtype=np.float64)
        if T and (not np.all(np.isfinite(tau_T)) or tau_T.min() < 0):
            raise ValueError(
                f"sample {self.title!r}: throughput must be finite and >= 0, "
                f"got {list(self.throughput)}"
            )

    @property
    def essential_T(self) -> list[bool]:
        return (
            list(self.essential) if self.essential is not None else [False] * len(self.throughput)
        )

    @property
    def dead_end_T(self) -> list[bool]:
        return list(self.dead_end) if self.dead_end is not None else [False] * len(self.throughput)

    def intensity_T(self) -> np.ndarray:
        """tau / the largest tau outside the answer span, clipped to [0, 1] (the answer, the
        flow's sink, carries the whole unit and would wash every other token out); the largest
        tau overall when nothing outside the answer has any; all zero when every tau is zero."""
        tau_T = np.asarray(self.throughput, dtype=np.float64)
        outside_T = tau_T[~np.asarray(self.answer, bool)] if tau_T.size else tau_T
        peak = outside_T.max() if outside_T.size and outside_T.max() > 0 else tau_T.max(initial=0)
        return np.clip(tau_T / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(tau_T)

    def heading(self) -> str:
        return self.title if self.reward is None else f"{self.title}  (reward {self.reward:g})"


def _hex(intensity: float) -> str:
    r, g, b = np.rint(WHITE + intensity * (ORANGE - WHITE)).astype(int)
    return f"#{r:02x}{g:02x}{b:02x}"


FLAG_NAMES = ("selected", "essential", "answer", "dead-end")


def _flags(sel: bool, ess: bool, ans: bool, dead: bool = False, names=FLAG_NAMES) -> list:
    return [name for name, on in zip(names, (sel, ess, ans, dead), strict=True) if on]


_CSS = """
body{font-family:sans-serif;margin:1.5em;max-width:70em}
.sample{margin:1em 0;padding:.6em;border:1px solid #ddd;border-radius:4px}
.head{font-weight:bold;margin-bottom:.3em}
.prompt{color:#888;font-family:monospace;margin-bottom:.4em;white-space:pre-wrap}
.resp{font-family:monospace;line-height:2.1em}
.tok,.key{white-space:pre;padding:1px 2px;margin:0 1px;border-bottom:3px solid transparent}
.sel{border-bottom:3px solid #000}
.ess{color:#0645ad;font-weight:bold}
.dead{color:#b03a2e;font-style:italic}
.answer{border:2px solid #2a9d2a;border-radius:3px;padding:3px 1px}
.legend{font-size:.9em;line-height:2.2em}
"""


def credit_html(samples: list[TokenSample], title: str, shade: str = "tau") -> str:
    """A self-contained HTML page (inline CSS, no JS) showing each sample's per-token credit.
    `shade` names what `throughput` holds (tau; "gamma" where a credit variant computes no
    tau)."""
    esc = html.escape
    legend = (
        f'<div class="legend">Background: {esc(shade)} / the largest {esc(shade)} outside the '
        "answer span (which carries all the flow), "
        f'<span class="key" style="background:{_hex(0.0)};border:1px solid #ccc">0</span> to '
        f'<span class="key" style="background:{_hex(1.0)}">1</span>; '
        '<span class="key sel">underlined</span>: selected (gamma &gt; 1); '
        '<span class="key ess">bold blue</span>: ground-truth essential; '
        + (
            '<span class="key dead">red italic</span>: a dead-end chain (the answer does not '
            "depend on it); "
            if any(s.dead_end is not None for s in samples)
            else ""
        )
        + '<span class="answer"><span class="key">boxed</span></span>: answer span (flow sink); '
        '<span class="prompt">grey</span>: prompt. Hover a token for its values.</div>'
    )
    blocks = []
    for sample in samples:
        parts, in_answer = [], False
        level_T, ess_T, dead_T = sample.intensity_T(), sample.essential_T, sample.dead_end_T
        for t, token in enumerate(sample.response_tokens):
            sel, ess, ans = bool(sample.selected[t]), bool(ess_T[t]), bool(sample.answer[t])
            dead = bool(dead_T[t])
            if ans != in_answer:
                parts.append('<span class="answer">' if ans else "</span>")
                in_answer = ans
            short = ("sel", "ess", "ans", "dead")
            classes = " ".join(["tok", *_flags(sel, ess, ans, dead, names=short)])
            values = [f"{shade}={float(sample.throughput[t]):.3f}"]
            if sample.gamma is not None and shade != "gamma":
                values.append(f"gamma={float(sample.gamma[t]):.3f}")
            tip = " ".join([*values, *_flags(sel, ess, ans, dead)])
            parts.append(
                f'<span class="{classes}" style="background:{_hex(level_T[t])}" '
                f'title="{esc(tip)}">{esc(token)}</span>'
            )
        if in_answer:
            parts.append("</span>")
        prompt = "".join(f'<span class="ptok">{esc(t)}</span>' for t in sample.prompt_tokens)
        blocks.append(
            f'<div class="sample"><div class="head">{esc(sample.heading())}</div>'
            f'<div class="prompt">{prompt}</div><div class="resp">{"".join(parts)}'
            "</div></div>"
        )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{_CSS}</style></head><body><h2>{esc(title)}</h2>{legend}\n"
        + "\n".join(blocks)
        + "\n</body></html>\n"
    )


def write_credit_html(
    path, samples: list[TokenSample], title: str, shade: str = "tau"
) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(credit_html(samples, title, shade), encoding="utf-8")
    return path


def _label(token: str) -> str:
    """Token text matplotlib shows literally: no mathtext, visible whitespace."""
    return token.replace("$", r"\$").replace(" ", "\u2423").replace("\n", "\\n") or "\u2205"


def _save(fig: Figure, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    fig.clear()  # Figure objects without pyplot are freed with their last reference
    return path


def credit_figure(samples: list[TokenSample], title: str, per_row: int = 40) -> Figure:
    """Rows of token boxes coloured by `TokenSample.intensity_T` (tau / the largest tau outside the
    answer span), wrapping every `per_row` tokens."""
    if not samples:
        raise ValueError("credit_figure needs at least one sample")
    width = max(1, min(per_row, max(len(s.response_tokens) for s in samples)))
    lines = []  # (kind, sample, first token) per row, top to bottom
    for sample in samples:
        lines += [("head", sample, 0), ("prompt", sample, 0)]
        lines += [("tokens", sample, i) for i in range(0, len(sample.response_tokens), width)]
        lines.append(("gap", sample, 0))
    fig = Figure(figsize=(max(7.0, 0.32 * width + 2.0), 0.8 + 0.36 * len(lines)))
    ax = fig.add_axes((0.02, 0.02, 0.84, 0.96 - 0.5 / fig.get_figheight()))
    mapper = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=TAU_CMAP)
    for row, (kind, sample, start) in enumerate(lines):
        if kind == "head":
            heading = _label(sample.heading()).replace("\u2423", " ")
            ax.text(0, -row, heading, fontsize=10, fontweight="bold", va="center")
        elif kind == "prompt":
            prompt = "".join(_label(t) for t in sample.prompt_tokens)
            cut = prompt if len(prompt) <= 4 * width else prompt[: 4 * width - 1] + "\u2026"
            text = "prompt: " + cut
            ax.text(0, -row, text, fontsize=8, color="#777777", va="center", family="monospace")
        elif kind == "tokens":
            stop = min(start + width, len(sample.response_tokens))
            _token_row(ax, sample, start, stop, -row, mapper)
    ax.set_xlim(-0.5, width + 0.5)
    ax.set_ylim(-len(lines) + 0.5, 0.7)
    ax.axis("off")
    ax.set_title(title, fontsize=12)
    cax = fig.add_axes((0.89, 0.1, 0.02, 0.8))
    fig.colorbar(mapper, cax=cax).set_label("tau / largest tau outside the answer")
    handles = [
        Rectangle((0, 0), 1, 1, fc="white", ec="black", lw=2.5, label="selected"),
        Line2D([], [], marker="v", ls="", color=ESSENTIAL_BLUE, label="essential"),
        Rectangle((0, 0), 1, 1, label="answer span", **ANSWER_BOX),
    ]
    if any(s.dead_end is not None for s in samples):
        handles.append(Line2D([], [], marker="^", ls="", color=DEAD_END_RED, label="dead end"))
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncols=4, frameon=False)
    return fig


def _token_row(ax, sample: TokenSample, start: int, stop: int, y: float, mapper) -> None:
    level_T, ess_T, dead_T = sample.intensity_T(), sample.essential_T, sample.dead_end_T
    for x, t in enumerate(range(start, stop)):
        sel, token = bool(sample.selected[t]), sample.response_tokens[t]
        edge = dict(ec="black", lw=2.5) if sel else dict(ec="#bbbbbb", lw=0.5)
        ax.add_patch(
            Rectangle((x - 0.45, y - 0.4), 0.9, 0.8, fc=mapper.to_rgba(level_T[t]), **edge)
        )
        size = 7 if len(token) < 3 else 4.5
        ax.text(x, y, _label(token), ha="center", va="center", fontsize=size, family="monospace")
        if ess_T[t]:
            ax.plot([x], [y + 0.52], marker="v", ms=4, color=ESSENTIAL_BLUE)
        if dead_T[t]:
            ax.plot([x], [y + 0.52], marker="^", ms=4, color=DEAD_END_RED)
    # One dashed box per run of answer tokens on this row.
    for is_answer, run in itertools.groupby(
        range(stop - start), lambda x: sample.answer[start + x]
    ):
        if is_answer:
            xs = list(run)
            ax.add_patch(Rectangle((xs[0] - 0.5, y - 0.47), len(xs), 0.94, zorder=3, **ANSWER_BOX))


def plot_credit_png(path, samples: list[TokenSample], title: str) -> pathlib.Path:
    return _save(credit_figure(samples, title), path)


def _validate_backbone(T: int, throughput, edges, source, sink) -> np.ndarray:
    for name, values in (("throughput", throughput), ("source", source), ("sink", sink)):
        if len(values) != T:
            raise ValueError(f"{name} has {len(values)} entries but there are {T} tokens")
    tau_T = np.asarray(throughput, dtype=np.float64)
    if T and (not np.all(np.isfinite(tau_T)) or tau_T.min() < 0):
        raise ValueError(f"throughput must be finite and >= 0, got {list(throughput)}")
    for src, dst, flow in edges:
        if not (0 <= src < T and 0 <= dst < T) or not (math.isfinite(flow) and flow >= 0):
            bad = f"edge ({src}, {dst}, {flow})"
            raise ValueError(f"{bad} needs indices in [0, {T}) and a finite flow >= 0")
    return tau_T


def _ring(face: str, edge: str, label: str) -> Line2D:
    return Line2D([], [], marker="o", ls="", mfc=face, mec=edge, mew=1.5, label=label)


def backbone_figure(
    tokens: list[str],
    throughput: list[float],
    edges: list[tuple[int, int, float]],
    source: list[bool],
    sink: list[bool],
    title: str,
) -> Figure:
    """Arc diagram: tokens left to right, nodes sized by tau, arcs (gid "edge i->k") by flow."""
    T = len(tokens)
    tau_T = _validate_backbone(T, throughput, edges, source, sink)
    fig = Figure(figsize=(max(8.0, 0.15 * T + 2.0), 5.0))
    ax = fig.add_axes((0.04, 0.17, 0.86, 0.73))
    peak_flow = max((flow for _, _, flow in edges), default=0.0) or 1.0
    top = 1.0
    for src, dst, flow in sorted(edges, key=lambda e: e[2]):  # biggest drawn last, on top
        span, share = abs(dst - src) or 0.5, flow / peak_flow
        look = dict(color=EDGE_PURPLE, lw=0.4 + 4.6 * share, alpha=0.15 + 0.85 * share, zorder=1)
        arc = Arc(((src + dst) / 2, 0), span, span, theta1=0, theta2=180, **look)
        arc.set_gid(f"edge {src}->{dst}")
        ax.add_patch(arc)
        top = max(top, span / 2)
    level_T = tau_T / tau_T.max() if T and tau_T.max() > 0 else np.zeros(T)
    colours = [
        SOURCE_GREEN if so else SINK_RED if si else "#555555"
        for so, si in zip(source, sink, strict=True)
    ]
    # The biggest node is about one token slot wide, so neighbours touch but do not hide.
    slot_pt = 0.86 * fig.get_figwidth() * 72 / (T + 1)
    biggest = min(150.0, (0.95 * slot_pt) ** 2)
    look = dict(cmap=TAU_CMAP, vmin=0, vmax=1, edgecolors=colours, linewidths=1.2, zorder=2)
    ax.scatter(np.arange(T), np.zeros(T), s=biggest * (0.1 + 0.9 * level_T), c=level_T, **look)
    fontsize = 9 if T <= 60 else 7 if T <= 120 else 6
    labels = [_label(t) for t in tokens]
    ax.set_xticks(np.arange(T), labels, rotation=90, fontsize=fontsize, family="monospace")
    for tick, colour in zip(ax.get_xticklabels(), colours, strict=True):
        tick.set_color(colour)
    ax.set_xlim(-1, T)
    ax.set_ylim(-0.06 * top, 1.08 * top)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title(title)
    handles = [
        _ring("white", SOURCE_GREEN, "source (question)"),
        _ring("white", SINK_RED, "sink (answer)"),
        _ring("#ffb366", "#555555", "node: size, colour = tau"),
        Line2D([], [], color=EDGE_PURPLE, lw=3, label="edge: width, alpha = flow"),
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=8, frameon=False)
    return fig


def plot_backbone_png(
    path,
    tokens: list[str],
    throughput: list[float],
    edges: list[tuple[int, int, float]],
    source: list[bool],
    sink: list[bool],
    title: str,
) -> pathlib.Path:
    return _save(backbone_figure(tokens, throughput, edges, source, sink, title), path)


Runs = dict[str, dict[int, dict[str, float]]]  # run name -> step -> metric key -> value


def curves_figure(runs: Runs, keys: list[str], title: str) -> Figure:
    """One subplot per metric key, one line per run (x = step); runs lacking a key are skipped."""
    if not keys:
        raise ValueError("curves_figure needs at least one metric key")
    present = {k for run in runs.values() for record in run.values() for k in record}
    if missing := [k for k in keys if k not in present]:
        raise ValueError(f"no run has metric keys {missing}; runs: {sorted(runs)}")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        for name, run in runs.items():
            if steps := sorted(s for s, record in run.items() if key in record):
                marker = "." if len(steps) < 30 else None
                ax.plot(steps, [run[s][key] for s in steps], label=name, marker=marker)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def plot_curves_png(path, runs: Runs, keys: list[str], title: str) -> pathlib.Path:
    return _save(curves_figure(runs, keys, title), path)
