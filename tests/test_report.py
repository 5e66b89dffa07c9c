"""The HTML report: distinct category colours, a sortable and searchable concept table, lazy images."""

import re
from html.parser import HTMLParser

from n2vdb import api
from n2vdb.render.report import CATEGORY_COLOURS, SCRIPT, category_colour


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))


def rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def test_category_colours_are_clearly_different():
    colours = [rgb(c) for c in CATEGORY_COLOURS.values()]
    for i, a in enumerate(colours):
        for b in colours[i + 1 :]:
            assert sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5 > 60, (a, b)
    # the pair the issue found alike (both red) now sits far apart
    red, purple = rgb(category_colour("color")), rgb(category_colour("material"))
    assert sum((x - y) ** 2 for x, y in zip(red, purple)) ** 0.5 > 150
    assert category_colour("unheard-of") == category_colour("unheard-of")  # stable for other categories


def test_report_is_self_contained_sortable_and_lazy(tmp_path, ingested_db):
    page = api.report(tmp_path / "report", ingested_db, cards=2)
    text = page.read_text()
    parser = Elements()
    parser.feed(text)
    images = [attrs for tag, attrs in parser.found if tag == "img"]
    assert images and all(a.get("loading") == "lazy" for a in images)
    scripts = [attrs for tag, attrs in parser.found if tag == "script"]
    assert scripts == [{}] and SCRIPT.strip() in text  # inline, nothing fetched
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", text)
    buttons = [a for tag, a in parser.found if tag == "button"]
    assert [b["data-column"] for b in buttons] == [str(i) for i in range(6)]
    assert any(tag == "input" and a.get("type") == "search" for tag, a in parser.found)
    # every concept row carries exact sort keys; category cells show the plots' colour
    scores = api.query("concept-scores", ingested_db).to_pylist()
    keys = re.findall(r"<td data-key='([^']*)'>", text)
    assert len(keys) == 6 * len(scores)
    first = scores[0]
    assert keys[3] == ("" if first["single_filter_iou"] is None else repr(first["single_filter_iou"]))
    assert f"background:{category_colour(first['category'])}" in text
