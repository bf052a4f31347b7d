"""Credit pictures: the HTML encodes every token signal faithfully; the PNGs render non-blank."""

import colorsys
import html.parser

import matplotlib.image
import numpy as np
import pytest
from matplotlib.patches import Arc

from ftjax import viz
from ftjax.tasks.vocab import VOCAB


def sample(**overrides) -> viz.TokenSample:
    fields = dict(
        title="prompt 0, reward 1",
        prompt_tokens=["<bos>", "1", "+", "2", "="],
        response_tokens=["a", "<eos>", "&", "<", "3", ">"],
        throughput=[0.2, 0.0, 1.5, 0.7, 0.9, 0.4],
        selected=[False, False, True, True, False, False],
        answer=[False, False, False, False, True, True],
        essential=[True, False, True, False, False, False],
        reward=1.0,
    )
    fields.update(overrides)
    return viz.TokenSample(**fields)


class TokenSpans(html.parser.HTMLParser):
    """Collects (classes, style, title, text) of every span whose class list holds "tok"."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.spans, self.depth, self.open = [], 0, None

    def handle_starttag(self, tag, attrs):
        if tag != "span":
            return
        self.depth += 1
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if "tok" in classes:
            self.open = (self.depth, classes, attrs.get("style", ""), attrs.get("title", ""))
            self.text = ""

    def handle_endtag(self, tag):
        if tag != "span":
            return
        if self.open is not None and self.open[0] == self.depth:
            _, classes, style, title = self.open
            self.spans.append((set(classes), style, title, self.text))
            self.open = None
        self.depth -= 1

    def handle_data(self, data):
        if self.open is not None:
            self.text += data


def parse(page: str):
    parser = TokenSpans()
    parser.feed(page)
    parser.close()
    return parser.spans


def saturation(style: str) -> float:
    hex_colour = style.split("background:")[1].strip().split(";")[0].lstrip("#")
    rgb = [int(hex_colour[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    return colorsys.rgb_to_hsv(*rgb)[1]


def test_html_has_one_escaped_span_per_response_token_with_faithful_markers():
    s = sample()
    page = viz.credit_html([s], "credit <test>")
    spans = parse(page)
    assert [text for *_, text in spans] == s.response_tokens
    for raw in ("<eos>", "<", "&"):
        assert f">{raw}<" not in page  # only the escaped form appears as span text
    assert "&lt;eos&gt;" in page and "&amp;" in page and "<title>credit &lt;test&gt;" in page

    sats = [saturation(style) for _, style, _, _ in spans]
    assert int(np.argmax(sats)) == int(np.argmax(s.throughput))
    assert "#ffffff" in spans[1][1] and sats[1] == 0.0  # tau = 0 is white
    assert np.all(np.diff(np.array(sats)[np.argsort(s.throughput)]) >= 0)

    for (classes, _, title, _), sel, ess, ans, tau in zip(
        spans, s.selected, s.essential, s.answer, s.throughput, strict=True
    ):
        assert ("sel" in classes) == sel and ("selected" in title.split()) == sel
        assert ("ess" in classes) == ess and ("essential" in title.split()) == ess
        assert ("ans" in classes) == ans and ("answer" in title.split()) == ans
        assert title.startswith(f"tau={tau:.3f}")
    assert page.count('class="answer"') == 2  # the legend's box and one box around the span
    assert "<script" not in page and "http" not in page and "selected (gamma" in page


def test_shade_is_relative_to_the_largest_tau_outside_the_answer():
    # the answer carries the whole unit; the other tokens are shaded against the largest of them
    s = sample(throughput=[0.2, 0.0, 0.1, 0.05, 1.0, 1.0])
    np.testing.assert_allclose(s.intensity_T(), [1.0, 0.0, 0.5, 0.25, 1.0, 1.0])
    only_answer = sample(throughput=[0.0, 0.0, 0.0, 0.0, 1.0, 0.5])
    np.testing.assert_allclose(only_answer.intensity_T(), [0, 0, 0, 0, 1.0, 0.5])
    np.testing.assert_array_equal(sample(throughput=[0.0] * 6).intensity_T(), np.zeros(6))


def test_html_writer_and_all_zero_throughput(tmp_path):
    flat = sample(throughput=[0.0] * 6, essential=None, reward=None)
    path = viz.write_credit_html(tmp_path / "sub" / "credit.html", [flat, sample()], "two")
    spans = parse(path.read_text(encoding="utf-8"))
    assert len(spans) == 12
    assert all(saturation(style) == 0.0 for _, style, _, _ in spans[:6])
    assert not any("ess" in classes for classes, *_ in spans[:6])


def test_dead_end_tokens_are_marked_in_html_and_only_then_in_the_legend():
    dead = [False, False, False, True, True, False]
    spans = parse(viz.credit_html([sample(dead_end=dead)], "t"))
    for (classes, _, title, _), d in zip(spans, dead, strict=True):
        assert ("dead" in classes) == d and ("dead-end" in title.split()) == d
    assert "a dead-end chain" in viz.credit_html([sample(dead_end=dead)], "t")
    assert "a dead-end chain" not in viz.credit_html([sample()], "t")
    assert not any("dead" in classes for classes, *_ in parse(viz.credit_html([sample()], "t")))


@pytest.mark.parametrize("field", ["throughput", "selected", "answer", "essential", "dead_end"])
def test_length_mismatch_names_the_field(field):
    with pytest.raises(ValueError, match=field):
        sample(**{field: [0.1] * 5 if field == "throughput" else [False] * 5})


def test_negative_throughput_is_rejected():
    with pytest.raises(ValueError, match="throughput"):
        sample(throughput=[0.2, -0.1, 1.5, 0.7, 0.9, 0.4])


def assert_png(path, min_width=300, min_height=150):
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= min_height and image.shape[1] >= min_width
    assert image[..., :3].std() > 0.01


def test_credit_png_wraps_long_responses(tmp_path):
    tokens = VOCAB.token_strings(VOCAB.encode("12+34=46;" * 10)) + ["<eos>"]
    T = len(tokens)
    rng = np.random.default_rng(0)
    long = sample(
        response_tokens=tokens,
        throughput=list(rng.random(T)),
        selected=list(rng.random(T) > 0.7),
        answer=[False] * (T - 3) + [True] * 3,
        essential=list(rng.random(T) > 0.8),
        dead_end=list(rng.random(T) > 0.8),
    )
    path = viz.plot_credit_png(tmp_path / "a" / "credit.png", [sample(), long], "credit")
    assert path.exists()
    assert_png(path)
    short = matplotlib.image.imread(viz.plot_credit_png(tmp_path / "one.png", [sample()], "x"))
    assert matplotlib.image.imread(path).shape[0] > short.shape[0]  # wrapped onto more rows


def backbone_args(T=12):
    tokens = VOCAB.token_strings(VOCAB.encode("12+34=" + "4" * (T - 6)))
    throughput = list(np.linspace(0.1, 2.0, T))
    edges = [(0, T - 1, 0.9), (2, 5, 0.1), (1, 3, 0.5)]
    source = [i < 5 for i in range(T)]
    sink = [i >= T - 2 for i in range(T)]
    return tokens, throughput, edges, source, sink


def test_backbone_arc_width_follows_flow(tmp_path):
    fig = viz.backbone_figure(*backbone_args(), title="backbone")
    arcs = {p.get_gid(): p for p in fig.axes[0].patches if isinstance(p, Arc)}
    assert set(arcs) == {"edge 0->11", "edge 2->5", "edge 1->3"}
    widths = {gid: arc.get_linewidth() for gid, arc in arcs.items()}
    assert widths["edge 0->11"] > widths["edge 1->3"] > widths["edge 2->5"]
    assert arcs["edge 0->11"].get_alpha() > arcs["edge 2->5"].get_alpha()

    path = viz.plot_backbone_png(
        tmp_path / "b" / "backbone.png", *backbone_args(200), title="T = 200"
    )
    assert_png(path, min_width=2000)


def test_backbone_validates_inputs():
    tokens, throughput, edges, source, sink = backbone_args()
    with pytest.raises(ValueError, match="sink"):
        viz.backbone_figure(tokens, throughput, edges, source, sink[:-1], "x")
    with pytest.raises(ValueError, match="edge"):
        viz.backbone_figure(tokens, throughput, [(0, 12, 0.5)], source, sink, "x")


def test_curves_png_and_missing_key(tmp_path):
    runs = {
        "uniform": {s: {"reward_mean": 0.1 * s, "loss": 1.0 / (s + 1)} for s in range(10)},
        "flowtracer": {s: {"reward_mean": 0.12 * s} for s in range(0, 10, 2)},
    }
    fig = viz.curves_figure(runs, ["reward_mean", "loss"], "curves")
    assert [len(ax.get_lines()) for ax in fig.axes[:2]] == [2, 1]
    path = viz.plot_curves_png(tmp_path / "c" / "curves.png", runs, ["reward_mean", "loss"], "c")
    assert_png(path)
    with pytest.raises(ValueError, match="accuracy"):
        viz.plot_curves_png(tmp_path / "x.png", runs, ["loss", "accuracy"], "c")
