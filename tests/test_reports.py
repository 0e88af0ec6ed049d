"""Plots for the Prefect UI: figures built from pipeline outputs, embedded as PNG data URIs in markdown."""
from __future__ import annotations

import base64
import io
import math
import re

import numpy as np
import pytest

from flows.reports import (PNG_SIGNATURE, corpus_figure, eval_scores_figure, loss_figure, png_markdown,
                           tokens_per_domain_figure, validation_figure)

DATA_URI = re.compile(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def png_images(markdown: str) -> list[bytes]:
    """The PNG bytes of every data-URI image of a markdown text (what the Prefect UI would show)."""
    return [base64.b64decode(payload, validate=True) for _, payload in DATA_URI.findall(markdown)]


def decoded_image(png: bytes) -> np.ndarray:
    """Pixels of a PNG, checked to be a real drawing: a sizeable image with more than a few colours."""
    from matplotlib.image import imread

    assert png.startswith(PNG_SIGNATURE)
    pixels = imread(io.BytesIO(png), format="png")
    height, width = pixels.shape[:2]
    assert height >= 200 and width >= 300, pixels.shape
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20  # axes, text, lines: not a blank canvas
    return pixels


def _metrics_rows(steps: int = 200, every: int = 20) -> list[dict[str, float]]:
    rows = []
    for step in range(1, steps + 1):
        row = {"step": float(step), "loss": 8.0 * math.exp(-step / 80) + 2.0, "lr": 3e-4 * min(1.0, step / 20)}
        # metrics.csv holds val_loss only on validation steps: NaN elsewhere (or no column at all)
        row["val_loss"] = row["loss"] + 0.1 if step % every == 0 else math.nan
        rows.append(row)
    return rows


def test_png_markdown_embeds_a_decodable_png_of_the_figure() -> None:
    markdown = png_markdown(loss_figure(_metrics_rows()), "loss [train]\nand lr")
    assert markdown.startswith("![loss (train) and lr](data:image/png;base64,")
    assert "\n" not in markdown
    (png,) = png_images(markdown)
    pixels = decoded_image(png)
    assert pixels.shape[1] == 8 * 80  # an 8-inch figure at the modest default dpi
    assert len(markdown) < 200_000


def test_png_markdown_takes_png_bytes_as_they_are_and_refuses_other_bytes() -> None:
    from flows.reports import png_bytes

    png = png_bytes(tokens_per_domain_figure({"tokens": 10, "domains": {
        "news": {"id": 0, "tokens": 10, "token_share": 1.0}}}), dpi=50)
    assert png_images(png_markdown(png, "tokens")) == [png]
    with pytest.raises(ValueError, match="not PNG"):
        png_markdown(b"GIF89a...", "not a png")


def test_a_busy_figure_is_drawn_smaller_to_stay_within_the_artifact_budget() -> None:
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    figure = Figure(figsize=(14, 9))
    axis = figure.subplots()
    axis.scatter(rng.random(30_000), rng.random(30_000), c=rng.random(30_000), s=2)  # noise compresses badly
    markdown = png_markdown(figure, "noise")
    assert len(markdown) < 200_000
    decoded_image(png_images(markdown)[0])


def test_loss_figure_draws_validation_points_only_where_rows_have_them() -> None:
    rows = _metrics_rows(steps=100, every=25)
    del rows[0]["val_loss"]  # a missing cell is the same as NaN
    figure = loss_figure(rows)
    loss_axis, lr_axis = figure.axes
    lines = {line.get_label(): line for line in loss_axis.get_lines()}
    assert set(lines) == {"training loss", "validation loss"}
    assert list(lines["validation loss"].get_xdata()) == [25.0, 50.0, 75.0, 100.0]
    assert lines["validation loss"].get_linestyle() == "None"  # points, not a line
    assert len(lines["training loss"].get_xdata()) == 100
    assert [line.get_label() for line in lr_axis.get_lines()] == ["learning rate"]
    # Rows without lr or val_loss: just the loss curve.
    bare = loss_figure([{"step": 1.0, "loss": 3.0}, {"step": 2.0, "loss": 2.5}])
    assert len(bare.axes) == 1 and [line.get_label() for line in bare.axes[0].get_lines()] == ["training loss"]


def test_validation_figure_draws_one_line_per_domain() -> None:
    figure = validation_figure({"news": [(20, 3.1), (10, 3.5), (30, math.nan)], "web": [(10, 4.0), (20, 3.8)]})
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert set(lines) == {"news", "web"}
    assert list(lines["news"].get_xdata()) == [10, 20] and list(lines["news"].get_ydata()) == [3.5, 3.1]
    decoded_image(png_images(png_markdown(figure, "validation"))[0])


def test_tokens_per_domain_figure_has_one_bar_per_domain() -> None:
    summary = {"tokens": 600, "domains": {"news": {"id": 0, "tokens": 450, "token_share": 0.75},
                                          "web": {"id": 1, "tokens": 150, "token_share": 0.25}}}
    figure = tokens_per_domain_figure(summary)
    assert [bar.get_height() for bar in figure.axes[0].patches] == [450, 150]
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["0 news", "1 web"]


def test_corpus_figure_stacks_lengths_per_domain_and_shows_quality() -> None:
    stats = {"length_buckets": ["<200", "200-1k", ">1k"], "quality_bins": ["0-0.5", "0.5-1"],
             "length_histogram": {"news": [1, 2, 3], "web": [4, 0, 1]}, "quality_histogram": [3, 8]}
    lengths, quality = corpus_figure(stats).axes
    assert len(lengths.patches) == 6 and [bar.get_height() for bar in quality.patches] == [3, 8]
    assert [bar.get_y() for bar in lengths.patches[3:]] == [1, 2, 3]  # web stacked on news


def test_eval_scores_figure_groups_ours_reference_and_chance_per_task() -> None:
    results = {"tasks": {
        "tnews": {"status": "ok", "title": "TNEWS", "scores": {"acc": 30.0}, "chance": {"expected": 25.0},
                  "reference": {"PanGu-α 2.6B": 60.95, "PanGu-α 13B": 60.26}},
        "cmrc2018": {"status": "ok", "title": "CMRC2018", "scores": {"em": 1.0, "f1": 9.0}, "chance": {"expected": 0.0},
                     "reference": {"PanGu-α 2.6B": {"em": 1.21, "f1": 16.65},
                                   "PanGu-α 13B": {"em": 1.46, "f1": 19.28}}},
        "bustm": {"status": "ok", "title": "BUSTM", "scores": {"acc": 55.0}, "chance": {"expected": 50.0},
                  "reference": None},
        "drcd": {"status": "not_found", "title": "DRCD", "message": "no data"},
    }}
    axis = eval_scores_figure(results).axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["TNEWS", "CMRC2018 EM", "CMRC2018 F1", "BUSTM"]
    heights = [bar.get_height() for bar in axis.patches]  # series by series: ours, 2.6B, 13B, chance
    groups = [heights[i:i + 4] for i in range(0, 16, 4)]
    assert groups[0] == [30.0, 1.0, 9.0, 55.0]
    assert groups[1][:3] == [60.95, 1.21, 16.65] and math.isnan(groups[1][3])  # no published BUSTM number
    assert groups[2][:3] == [60.26, 1.46, 19.28]
    assert groups[3] == [25.0, 0.0, 0.0, 50.0]
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["ours", "PanGu-α 2.6B", "PanGu-α 13B", "chance"]
    empty = eval_scores_figure({"tasks": {"drcd": results["tasks"]["drcd"]}})
    assert not empty.axes[0].patches


def test_chinese_domain_names_are_drawn_with_a_font_that_has_them(fetched_assets) -> None:
    """Domain names of a Chinese corpus (新闻, 百科) were drawn as boxes: matplotlib's DejaVu Sans has no CJK
    glyphs. With the fetched font every character of the labels has a glyph."""
    import warnings

    from flows.reports import cjk_font_family, png_bytes

    cjk_font_family.cache_clear()  # as a new process finds it, whatever earlier tests drew
    assert cjk_font_family() == "WenQuanYi Micro Hei"
    summary = {"tokens": 600, "domains": {"新闻": {"id": 0, "tokens": 450, "token_share": 0.75},
                                          "百科 web": {"id": 1, "tokens": 150, "token_share": 0.25}}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded_image(png_bytes(tokens_per_domain_figure(summary)))
    assert not [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_without_a_chinese_font_the_log_says_so_once(tmp_path, monkeypatch, caplog) -> None:
    import flows.reports

    monkeypatch.setattr(flows.reports, "assets_dir", lambda: tmp_path)  # nothing fetched
    monkeypatch.setattr(flows.reports, "SYSTEM_CJK_FAMILIES", ())  # and nothing installed
    flows.reports.cjk_font_family.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="flows.reports"):
            for _ in range(2):
                flows.reports.png_bytes(tokens_per_domain_figure({"tokens": 1, "domains": {
                    "新闻": {"id": 0, "tokens": 1, "token_share": 1.0}}}))
        said = [r.getMessage() for r in caplog.records if "Chinese" in r.getMessage()]
        assert len(said) == 1 and "pangu data fetch-assets" in said[0], said
    finally:
        flows.reports.cjk_font_family.cache_clear()
