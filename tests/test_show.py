"""Seeing it: distribution grids and the HTML report on the built-in concept set."""

import re
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
from PIL import Image

from n2vdb import api
from n2vdb.render import grids

from helpers import run_cli


def tiles_in(path: Path) -> int:
    """Count the captioned tiles in a grid sheet: white caption strips under each tile."""
    sheet = np.asarray(Image.open(path).convert("L"))
    top = 24
    row = sheet[top : top + grids.TILE]
    columns = 0
    for i in range(6):
        x = 4 + i * (grids.TILE + 4)
        if x + grids.TILE <= sheet.shape[1] and row[:, x : x + grids.TILE].std() > 5:
            columns += 1
    return columns


def test_pick_samples_quantiles():
    scores = {i: i / 100 for i in range(101)}
    picked = grids.pick(scores)
    assert [s.image_id for s in picked] == [100, 99, 95, 90, 75, 50]
    assert [s.image_id for s in grids.pick({7: 0.5, 3: 0.2})] == [7, 3]


def test_concept_grid(tmp_path, ingested_db):
    out = tmp_path / "red.png"
    path, samples, values = api.show_concept("red", ingested_db, out=out)
    assert path == out and out.exists()
    con = duckdb.connect(str(ingested_db), read_only=True)
    expected = con.execute(
        "SELECT count(*) FROM image_concept_scores s JOIN concepts c USING (concept_id)"
        " WHERE c.name = 'red-c' AND s.method = 'segmentation'"
    ).fetchone()[0]
    assert len(values) == expected
    width, height = Image.open(out).size
    assert width == 6 * (grids.TILE + 4) + 4
    assert height == grids.TILE + grids.CAPTION + 4 + 24
    assert tiles_in(out) == len(samples) == len({s.image_id for s in samples})
    ordered = [s.score for s in samples]
    assert ordered == sorted(ordered, reverse=True)


def test_filter_grid_and_cli(tmp_path, ingested_db):
    out = tmp_path / "f.png"
    result = run_cli("show", "filter", "3", "--out", out, "--db", ingested_db)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert tiles_in(out) == 6
    bad = run_cli("show", "filter", "999", "--db", ingested_db)
    assert bad.returncode == 2 and "filters 0..255" in bad.stderr and "Traceback" not in bad.stderr


def test_show_concept_cli_prints_distribution(tmp_path, ingested_db):
    result = run_cli(
        "show", "concept", "circle", "--method", "best_filter", "--out", tmp_path / "c.png", "--db", ingested_db
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"per-image IoU over \d+ images", result.stderr)
    assert (tmp_path / "c.png").exists()


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href"):
                self.targets.append(value)


def test_report_links_resolve(tmp_path, ingested_db):
    page = api.report(tmp_path / "report", ingested_db, cards=2)
    parser = Links()
    parser.feed(page.read_text())
    assert len(parser.targets) >= 3 + 2 * 3  # scatter, bars, exclusivity + per card: histogram, two grids
    for target in parser.targets:
        assert not target.startswith(("http:", "https:", "/")), target
        assert (page.parent / target).is_file(), target
    text = page.read_text()
    assert "Single filter vs embedding" in text and "Filter exclusivity" in text
    assert "ingest with <code>--sufficiency</code>" in text  # this probe has no sufficiency runs
    for target in parser.targets:
        Image.open(page.parent / target).verify()
