"""Seeing results: the HTML report `zsad run` writes, `zsad report`, `zsad compare` and
`zsad export-maps` on real tiny-model runs (in-process executor), the pages loaded in headless Chromium,
and the report and the export to and from the loopback S3 server."""

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.io import fs as fsio
from pipeline.io.images import decode_image
from pipeline.ops import rle
from pipeline.ops.heatmap import decode_png16_levels, dequantise
from pipeline.report import render
from pipeline.report.runread import heat, mask_rows, open_run, predicted_mask
from pipeline.stages.evaluate import read_mask
from pipeline.synthetic import make_dataset
from tests.helpers import browser
from tests.helpers.clip_weights import random_clip_checkpoint
from tests.helpers.zsad import zsad as _zsad

pytestmark = pytest.mark.integration
SECTIONS = ("run", "errors-by-type", "metrics", "colour-scale", "category-tile", "category-widget", "failed-inputs")


def zsad(*args, timeout=400):
    """The CLI (tests/helpers/zsad.py) with the report on: it is what these tests check."""
    return _zsad(*args, timeout=timeout, report=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run a: random weights, both categories, a stored threshold mask, 3 examples per row; run b:
    weights from a checkpoint file (so not random), tile only, report switched off."""
    root = tmp_path_factory.mktemp("report")
    data, out = root / "data", root / "out"
    make_dataset(str(data))
    ckpt = root / "clip.pt"
    random_clip_checkpoint(ckpt)
    done = {}
    for run_id, extra in (
        ("a", ["--set", "report.top=3", "--set", "maps.threshold=0.6"]),
        ("b", ["--categories", "tile", "--set", f"clip.weights={ckpt}", "--set", "report.enabled=false"]),
    ):
        r = zsad("run", "jobs/smoke.yaml", "-i", str(data), "-o", str(out), "--run-id", run_id, *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        done[run_id] = (out / run_id, r.stdout)
    return done


class Page(HTMLParser):
    """Every element's tag and attributes, plus the text, of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.stack: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.elements if "id" in a}

    def find(self, tag=None, **attrs):
        return [
            a for t, a in self.elements if (tag is None or t == tag) and all(a.get(k) == v for k, v in attrs.items())
        ]


def _cards(text: str, row_class: str) -> list[str]:
    """The HTML of each card in the example rows of class ``row_class``."""
    blocks = re.findall(
        rf'<div class="cards {row_class}">(.*?)</div></div>(?=<h3|</section>|<p class="note">none)', text, re.S
    )
    return [c for b in blocks for c in re.split(r'(?=<div class="card")', b) if c.startswith('<div class="card"')]


def _png(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def test_run_writes_a_report_with_every_section(runs):
    run_dir, stdout = runs["a"]
    path = run_dir / "report.html"
    assert path.exists() and f"report: {path}" in stdout
    text = path.read_text()
    page = Page(text)
    assert set(SECTIONS) <= page.ids()
    assert "random-weights-banner" in page.ids()
    assert "NOT anomaly detection results" in text
    for cat in ("tile", "widget"):
        section = text[text.index(f'id="category-{cat}"') :]
        section = section[: section.index("</section>")]
        assert section.count("<svg") == 0 and section.count("data:image/svg+xml") == 4  # ROC, PR, PRO, histogram
        assert "image F1-max threshold" in section  # labelled: the threshold is F1-max's
    top, near = _cards(text, "examples-top"), _cards(text, "examples-threshold")
    assert len(top) == 6 and len(near) == 6  # 3 + 3 per category
    for card in top + near:
        assert 'class="thumb"' in card and 'class="overlay"' in card
    scores = pd.read_parquet(run_dir / "scores")
    for cat in ("tile", "widget"):  # the top row holds the category's highest scores, in order
        want = scores[scores["category"] == cat].sort_values("score", ascending=False)["image_id"].head(3).tolist()
        got = [re.search(r'data-image-id="([0-9a-f]+)"', c).group(1) for c in top]
        assert [g for g in got if g in set(scores.loc[scores["category"] == cat, "image_id"])] == want
    assert "No input failed." in text and "16 listed: 16 ok" in text


def test_report_has_no_external_resource(runs):
    text = (runs["a"][0] / "report.html").read_text()
    page = Page(text)
    for tag, attrs in page.elements:
        for key in ("src", "href", "srcset", "data", "poster", "action"):
            if key in attrs:
                assert attrs[key].startswith(("data:", "#")), f"<{tag} {key}={attrs[key][:60]}>"
    assert not page.find("script") and not page.find("link") and not page.find("iframe")
    assert "@import" not in text and "url(" not in text
    outside_text = re.sub(r">[^<]*<", "><", text)  # markup only, text removed
    assert not re.search(r"https?://", outside_text)


def test_heatmaps_share_one_colour_scale(runs):
    """Every overlay equals the overlay computed here from the stored map on the page's ONE scale
    (up to the 256-colour palette), and not the one a per-image range would give."""
    run_dir = runs["a"][0]
    text = (run_dir / "report.html").read_text()
    section = Page(text).find("section", id="colour-scale")[0]
    scale = render.ColourScale(float(section["data-lo"]), float(section["data-hi"]), section["data-cmap"])
    run = open_run(str(run_dir))
    cards = _cards(text, "examples-top") + _cards(text, "examples-threshold")
    ids = [re.search(r'data-image-id="([0-9a-f]+)"', c).group(1) for c in cards]
    rows = mask_rows(run, set(ids))
    by_id = run.scores.set_index("image_id")
    own_gaps = []
    for card, image_id in zip(cards, ids):
        got = _png(re.search(r'<img src="([^"]+)" alt="heatmap overlay"', card).group(1)).astype(float)
        rgb = decode_image((Path(by_id.at[image_id, "uri"])).read_bytes(), 10**8)
        hm = heat(rows[image_id])
        pred, _ = predicted_mask(rows[image_id])
        mask_uri = by_id.at[image_id, "mask_uri"]
        truth = read_mask(mask_uri, None) if isinstance(mask_uri, str) else None
        size = got.shape[:2]
        want = _palette(render.overlay(rgb, hm, scale, size, predicted=pred, truth=truth))
        assert np.abs(got - want).max() == 0, image_id
        own = render.ColourScale(float(hm.min()), float(hm.max()) + 1e-9, scale.cmap)
        own_gaps.append(np.abs(got - _palette(render.overlay(rgb, hm, own, size, predicted=pred, truth=truth))).mean())
    assert max(own_gaps) > 8.0  # a per-image colour range would look different


def _palette(rgb):
    """The picture as the page stores it (the report's palette PNG), decoded."""
    from pipeline.report.report import COLOURS

    return np.asarray(Image.open(io.BytesIO(render.png_bytes(rgb, COLOURS))).convert("RGB")).astype(float)


def test_report_switch_and_the_report_command(runs):
    run_dir = runs["b"][0]
    assert not (run_dir / "report.html").exists()  # report.enabled: false
    out = run_dir.parent / "pages" / "b.html"
    r = zsad("report", str(run_dir), "--out", str(out), "--top", "2")
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    page = Page(text)
    assert "random-weights-banner" not in page.ids() and "RANDOM MODEL WEIGHTS" not in text
    assert "category-tile" in page.ids() and "category-widget" not in page.ids()
    assert len(_cards(text, "examples-top")) == 2
    bad = zsad("report", str(run_dir.parent / "nope"))
    assert bad.returncode == 2 and "no zsad run" in bad.stderr


def test_report_and_compare_in_chromium(runs, tmp_path):
    report = runs["a"][0] / "report.html"
    dom = browser.dump_dom(str(report))
    for section in SECTIONS + ("random-weights-banner",):
        assert f'id="{section}"' in dom
    shot = np.asarray(Image.open(browser.screenshot(str(report), str(tmp_path / "report.png"))).convert("RGB")).astype(
        float
    )
    assert shot.std() > 20 and (shot.min(axis=2) < 200).mean() > 0.05  # not blank: text, tables, the red banner
    assert (
        (shot[..., 0] > 150) & (shot[..., 1] < 60) & (shot[..., 2] < 80)
    ).mean() > 0.01  # the banner is red and large

    page = tmp_path / "compare.html"
    r = zsad("compare", str(runs["a"][0]), str(runs["b"][0]), "--out", str(page), "--top", "4")
    assert r.returncode == 0, r.stderr
    dom = browser.dump_dom(str(page))
    for section in ("compare-runs", "compare-metrics", "compare-scatter", "compare-rank-changes"):
        assert f'id="{section}"' in dom
    assert dom.count('class="card"') == 4
    assert "8 images were scored ok in both runs" in dom  # the tile images
    shot = np.asarray(Image.open(browser.screenshot(str(page), str(tmp_path / "compare.png"))).convert("RGB")).astype(
        float
    )
    assert shot.std() > 20


def test_compare_content_and_refusal(runs, tmp_path):
    a, b = (str(runs[k][0]) for k in "ab")
    page = tmp_path / "ab.html"
    assert zsad("compare", a, b, "--out", str(page)).returncode == 0
    text = page.read_text()
    sa, sb = pd.read_parquet(Path(a) / "scores"), pd.read_parquet(Path(b) / "scores")
    both = sa.merge(sb, on="image_id", suffixes=("_a", "_b"))
    assert len(both) == 8
    rho = both["score_a"].rank().corr(both["score_b"].rank())
    assert f'<td>tile</td><td class="num">8</td><td class="num">{rho:.4f}</td>' in text
    ma = pd.read_parquet(Path(a) / "metrics").set_index("category")
    mb = pd.read_parquet(Path(b) / "metrics").set_index("category")
    delta = 100 * (mb.at["tile", "image_auroc"] - ma.at["tile", "image_auroc"])
    assert f"{delta:+.1f}" in text
    # run c: b's folder with the tile images' rows swapped for the widget images of a (other URIs):
    # the runs then share no image
    c = tmp_path / "c"
    import shutil

    shutil.copytree(b, c)
    widget = sa[sa["category"] == "widget"].reset_index(drop=True)
    for f in (c / "scores").glob("*.parquet"):
        f.unlink()
    widget.to_parquet(c / "scores" / "shard-00000.parquet")
    r = zsad("compare", b, str(c), "--out", str(tmp_path / "bc.html"))
    assert r.returncode == 2 and "share no images" in r.stderr and not (tmp_path / "bc.html").exists()


def test_export_maps_round_trip(runs, tmp_path):
    run_dir = runs["a"][0]
    masks = pd.read_parquet(run_dir / "masks")
    ok = masks[masks["status"] == "ok"]
    for fmt in ("png16", "png8", "npy"):
        out = tmp_path / fmt
        r = zsad(
            "export-maps", str(run_dir), "--out", str(out), "--format", fmt, *(["--overlay"] if fmt == "png16" else [])
        )
        assert r.returncode == 0, r.stderr
        index = pd.read_csv(out / "index.csv")
        assert len(index) == len(ok) and set(index["image_id"]) == set(ok["image_id"])
        for row in ok.itertuples():
            entry = index[index["image_id"] == row.image_id].iloc[0]
            rel = Path(row.uri).relative_to(run_dir.parent.parent / "data").with_suffix("")
            levels = decode_png16_levels(row.map_png)
            if fmt == "png16":
                assert entry["map"] == f"{rel}_map.png"
                assert np.array_equal(np.asarray(Image.open(out / entry["map"])).astype(np.int64), levels)
                image = Image.open(row.uri)
                assert Image.open(out / entry["overlay"]).size == image.size
                if isinstance(row.mask_rle, str):
                    assert np.array_equal(
                        np.asarray(Image.open(out / entry["mask"])) > 0, rle.decode(json.loads(row.mask_rle))
                    )
            elif fmt == "png8":
                assert np.array_equal(
                    np.asarray(Image.open(out / entry["map"])), np.floor(levels / 257 + 0.5).astype(np.uint8)
                )
            else:
                assert np.array_equal(
                    np.load(out / entry["map"]), dequantise(levels, row.map_min, row.map_max).astype(np.float32)
                )
    assert ok["mask_rle"].notna().any()  # the run stored threshold masks, so the mask branch ran
    bad = zsad("export-maps", str(run_dir), "--out", str(tmp_path / "x"), "--format", "tiff")
    assert bad.returncode == 2 and "--format 'tiff'" in bad.stderr


def test_report_and_export_to_and_from_s3(runs, s3_bucket, s3_env, tmp_path):
    fs, _ = fsio.filesystem(f"s3://{s3_bucket}/x", fsio.storage_options())
    fs.put(str(runs["a"][0]), f"{s3_bucket}/runs/a", recursive=True)
    run_uri = f"s3://{s3_bucket}/runs/a"
    env_run = zsad("report", run_uri, "--top", "2")
    assert env_run.returncode == 0, env_run.stderr
    text = fs.cat(f"{s3_bucket}/runs/a/report.html").decode()
    assert "category-widget" in Page(text).ids() and len(_cards(text, "examples-top")) == 4
    r = zsad("export-maps", run_uri, "--out", f"s3://{s3_bucket}/maps", "--overlay")
    assert r.returncode == 0, r.stderr
    index = pd.read_csv(io.BytesIO(fs.cat(f"{s3_bucket}/maps/index.csv")))
    masks = pd.read_parquet(runs["a"][0] / "masks")
    first = index.iloc[0]
    stored = masks.set_index("image_id").at[first["image_id"], "map_png"]
    assert fs.cat(f"{s3_bucket}/maps/{first['map']}") == stored
    assert len(index) == (masks["status"] == "ok").sum()
