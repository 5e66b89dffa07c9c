"""A static HTML report of one probe: the paper's views, plots as PNG files beside index.html.

Plots use matplotlib (Agg backend, no display); every number comes from a named query, so the report
shows exactly what `n2vdb query` shows.
"""

from __future__ import annotations

import html
from pathlib import Path

import duckdb
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from n2vdb import queries  # noqa: E402
from n2vdb.data.broden import BrodenDataset  # noqa: E402
from n2vdb.data.names import file_stem  # noqa: E402
from n2vdb.errors import NotFound  # noqa: E402
from n2vdb.probe import Probe  # noqa: E402
from n2vdb.render import grids  # noqa: E402
from n2vdb.render.output import cell, formatted_columns  # noqa: E402

# Okabe and Ito's colour-blind-safe palette: six hues no two of which are read as the same.
# The four pixel-level categories (the scatter and the curves) take the four hues furthest apart.
CATEGORY_COLOURS = {
    "object": "#0072B2",
    "part": "#009E73",
    "color": "#D55E00",
    "material": "#CC79A7",
    "scene": "#E69F00",
    "texture": "#56B4E9",
}
_SPARE_COLOURS = ("#000000", "#F0E442", "#999999")


def category_colour(category: str) -> str:
    """The category's colour in every plot and table; categories beyond Broden's six get the spares."""
    if category in CATEGORY_COLOURS:
        return CATEGORY_COLOURS[category]
    return _SPARE_COLOURS[sum(category.encode()) % len(_SPARE_COLOURS)]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _table(rows: list[dict], columns: list[str] | None = None, interactive: bool = False) -> str:
    """An HTML table; interactive ones sort by a click on a header and filter as one types (SCRIPT)."""
    if not rows:
        return "<p><em>no rows</em></p>"
    columns = columns or list(rows[0])
    formats = formatted_columns(rows, columns)
    if not interactive:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(formats[c](r[c]))}</td>" for c in columns) + "</tr>" for r in rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    head = "".join(
        f"<th><button type='button' data-column='{i}'>{html.escape(c)}</button></th>" for i, c in enumerate(columns)
    )
    body = []
    for r in rows:
        cells = []
        for c in columns:
            value = r[c]
            shown = html.escape(formats[c](value))
            if c == "category" and isinstance(value, str):
                shown = f"<span class='swatch' style='background:{category_colour(value)}'></span>{shown}"
            # the sort key: full precision for numbers, the text otherwise
            key = "" if value is None else html.escape(repr(value) if isinstance(value, float) else str(value))
            cells.append(f"<td data-key='{key}'>{shown}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<div class='sortable'><input type='search' placeholder='filter rows' aria-label='filter rows'> "
        f"<span class='count'>{len(rows)} rows</span><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _error(rows: list[dict], column: str) -> list[list[float]] | None:
    """matplotlib's [below, above] error lengths of COLUMN from its _lower and _upper bounds (n2vdb
    significance), or None where a row has none."""
    lower, upper = f"{column}_lower", f"{column}_upper"
    if not rows or any(r.get(lower) is None or r.get(upper) is None for r in rows):
        return None
    return [[r[column] - r[lower] for r in rows], [r[upper] - r[column] for r in rows]]


def _scatter(scores: list[dict], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for category in sorted({r["category"] for r in scores}):
        members = [r for r in scores if r["category"] == category]
        pts = [(r["single_filter_iou"], r["embedding_iou"]) for r in members]
        colour = category_colour(category)
        xerr, yerr = _error(members, "single_filter_iou"), _error(members, "embedding_iou")
        if xerr is not None and yerr is not None:  # 95% bootstrap intervals
            ax.errorbar(*zip(*pts), xerr=xerr, yerr=yerr, fmt="none", ecolor=colour, alpha=0.35, lw=0.8)
        ax.scatter(*zip(*pts), s=18, label=category, color=colour)
    top = max(max(r["single_filter_iou"], r["embedding_iou"]) for r in scores) * 1.05
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="best single filter, val IoU", ylabel="embedding, val IoU", title="Per concept")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _bars(rows: list[dict], path: Path) -> str:
    rows = [r for r in rows if r["category"] != "all"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(rows))
    single, embedding = _error(rows, "single_filter_iou"), _error(rows, "embedding_iou")
    ax.bar([i - 0.2 for i in x], [r["single_filter_iou"] for r in rows], 0.4, yerr=single, label="best single filter")
    ax.bar([i + 0.2 for i in x], [r["embedding_iou"] for r in rows], 0.4, yerr=embedding, label="embedding")
    ax.set_xticks(list(x), [r["category"] for r in rows])
    ax.set(ylabel="mean val IoU", title="Per category")
    ax.legend()
    return _save(fig, path)


def _exclusivity(
    rows: list[dict],
    path: Path,
    share: str = "share",
    xlabel: str = "concepts for which the filter is the best single filter",
) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["concepts_per_filter"] for r in rows], [100 * r[share] for r in rows], color="tab:gray")
    ax.set(xlabel=xlabel, ylabel="% of filters", title="Filter exclusivity")
    return _save(fig, path)


def _sufficiency(rows: list[dict], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for category in sorted({r["category"] for r in rows}):
        pts = sorted((r["n_filters"], r["mean_share_of_full"]) for r in rows if r["category"] == category)
        ax.plot(*zip(*pts), marker="o", label=category, color=category_colour(category))
    ax.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="filters kept (top |w|)", ylabel="val IoU / full embedding's", title="Sufficiency")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _histogram(values: list[float], path: Path, title: str) -> str:
    fig, ax = plt.subplots(figsize=(3.2, 2))
    ax.hist(values, bins=20, range=(0, 1), color="tab:blue")
    ax.set(xlabel="per-image IoU", title=title)
    return _save(fig, path)


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
img{max-width:100%}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}
.card{border:1px solid #ddd;padding:1em;margin:1em 0}.row{display:flex;gap:1em;flex-wrap:wrap;align-items:flex-start}
th button{font:inherit;font-weight:bold;border:0;background:none;cursor:pointer;padding:0}
th[aria-sort=ascending] button::after{content:" \\25B2"}th[aria-sort=descending] button::after{content:" \\25BC"}
.sortable input{margin:.5em 0;padding:3px 6px;width:16em}.count{color:#666;font-size:13px}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:50%;margin-right:.4em;vertical-align:-1px}"""

# Sorting and filtering, inline: the report opens from disk with no server and no CDN.
SCRIPT = """
document.querySelectorAll('.sortable').forEach(function (box) {
  var body = box.querySelector('tbody'), search = box.querySelector('input'), count = box.querySelector('.count');
  var rows = Array.prototype.slice.call(body.rows);
  function key(row, i) { return row.cells[i].getAttribute('data-key'); }
  box.querySelectorAll('th button').forEach(function (button) {
    button.addEventListener('click', function () {
      var i = +button.getAttribute('data-column'), th = button.parentNode;
      var down = th.getAttribute('aria-sort') !== 'descending';
      box.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', down ? 'descending' : 'ascending');
      var numeric = rows.every(function (r) { var k = key(r, i); return k === '' || !isNaN(parseFloat(k)); });
      rows.sort(function (a, b) {
        var x = key(a, i), y = key(b, i);
        if (x === '' || y === '') { return (x === '') - (y === ''); }  // empty cells last either way
        var order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
        return down ? -order : order;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  search.addEventListener('input', function () {
    var words = search.value.toLowerCase().split(/\\s+/).filter(Boolean), shown = 0;
    rows.forEach(function (r) {
      var text = r.textContent.toLowerCase();
      var match = words.every(function (w) { return text.indexOf(w) >= 0; });
      r.hidden = !match; shown += match;
    });
    count.textContent = shown + ' of ' + rows.length + ' rows';
  });
});
"""


def build(con: duckdb.DuckDBPyConnection, probe: Probe, dataset: BrodenDataset, out: Path, cards: int = 8) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cards").mkdir(exist_ok=True)
    q = lambda name, **kw: queries.run(con, name, probe=probe.probe_id, **kw).to_pylist()  # noqa: E731
    meta = con.execute(
        "SELECT model, layer, weights, n_filters, height, width FROM probes WHERE probe_id = ?", [probe.probe_id]
    ).fetchone()
    scores = q("concept-scores")
    seg = [r for r in scores if r["embedding_iou"] is not None and r["single_filter_iou"] is not None]
    summary = q("single-vs-embedding")
    parts = [
        f"<h1>Probe {probe.probe_id}: {html.escape(meta[0])} {html.escape(meta[1])}</h1>",
        f"<p>weights {html.escape(meta[2])}; {meta[3]} filters at {meta[4]}x{meta[5]}; "
        f"dataset {html.escape(dataset.root.name)}</p>",
        "<h2>Single filter vs embedding</h2><div class='row'>",
    ]
    if seg:
        parts.append(_img(_scatter(seg, out / "scatter.png"), "per-concept scatter"))
        parts.append(_img(_bars(summary, out / "categories.png"), "per-category bars"))
    parts.append("</div>" + _table(summary))
    curve = q("sufficiency-curve")
    parts.append("<h2>Sufficiency</h2>")
    if len({r["n_filters"] for r in curve}) > 1:
        parts.append(_img(_sufficiency(curve, out / "sufficiency.png"), "sufficiency curves"))
    else:
        parts.append("<p>No sufficiency runs for this probe: ingest with <code>--sufficiency</code>.</p>")
    parts.append("<h2>Filter exclusivity</h2>")
    parts.append(_img(_exclusivity(q("exclusivity"), out / "exclusivity.png"), "exclusivity"))
    in_embeddings = q("embedding-exclusivity")
    if sum(r["filters"] for r in in_embeddings):
        plot = _exclusivity(
            in_embeddings,
            out / "embedding-exclusivity.png",
            "share_of_filters",
            "segmentation embeddings giving the filter a weight >= 0.5 x their largest",
        )
        parts.append(_img(plot, "exclusivity in the embeddings"))
    parts.append(
        "<h2>Concepts</h2>"
        + _table(
            scores,
            ["concept", "category", "best_filter", "single_filter_iou", "embedding_iou", "classification_accuracy"],
            interactive=True,
        )
    )
    for r in seg[:cards]:
        parts.append(_card(con, probe, dataset, out, r))
    page = out / "index.html"
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>n2vdb probe {probe.probe_id}"
        f"</title><style>{STYLE}</style></head><body>{''.join(parts)}<script>{SCRIPT}</script>"
        "</body></html>"
    )
    return page


def _img(src: str, alt: str) -> str:
    """Images load as they scroll into view, so a report with many cards opens at once."""
    return f"<img loading='lazy' src='{html.escape(src)}' alt='{html.escape(alt)}'>"


def _card(con, probe: Probe, dataset: BrodenDataset, out: Path, row: dict) -> str:
    name = row["concept"]
    concept_id = con.execute(
        "SELECT concept_id FROM concepts WHERE dataset_id = ? AND name = ?", [probe.dataset_id, name]
    ).fetchone()[0]
    slug = file_stem(name)
    embedding_grid, _ = grids.concept_grid(
        con, probe, dataset, concept_id, name, "segmentation", out / "cards" / f"{slug}-embedding.png"
    )
    filter_grid, _ = grids.concept_grid(
        con, probe, dataset, concept_id, name, "best_filter", out / "cards" / f"{slug}-filter.png"
    )
    per_image = [
        v
        for (v,) in con.execute(
            "SELECT iou FROM image_concept_scores WHERE probe_id = ? AND concept_id = ? AND method = 'segmentation'",
            [probe.probe_id, concept_id],
        ).fetchall()
    ]
    hist = _histogram(per_image, out / "cards" / f"{slug}-hist.png", f"{name}: embedding")
    try:  # the paper's non-maximal view: every image, across the concept's classification score
        everywhere, _, _ = grids.distribution_grid(con, probe, dataset, name, out / "cards" / f"{slug}-all.png")
        overall = (
            f"<p>All images, across the classification score:</p>"
            f"{_img(f'cards/{everywhere.name}', f'{name} over all images')}"
        )
    except NotFound:
        overall = ""
    nearest = queries.run(con, "nearest", probe=probe.probe_id, concept=name, k=5).to_pylist()
    return (
        f"<div class='card' id='{slug}'><h3>{html.escape(name)} ({html.escape(row['category'])})</h3>"
        f"<p>embedding val IoU {cell(row['embedding_iou'])}, best single filter {row['best_filter']} "
        f"val IoU {cell(row['single_filter_iou'])}</p><div class='row'>"
        f"{_img(f'cards/{hist}', 'per-image IoU histogram')}"
        f"{_table(nearest, ['rank', 'concept', 'similarity'])}</div>"
        f"<p>Embedding, images across the per-image IoU distribution:</p>"
        f"{_img(f'cards/{embedding_grid.name}', f'{name} embedding grid')}"
        f"<p>Best single filter:</p>{_img(f'cards/{filter_grid.name}', f'{name} filter grid')}"
        f"{overall}</div>"
    )
