"""The Broden-format reader and importer against truth computed independently in conftest."""

from pathlib import Path

import duckdb
import numpy as np
import pytest

from n2vdb import api
from n2vdb.data.broden import BrodenDataset, parse_categories
from n2vdb.errors import DatasetError, N2vdbError

from helpers import run_cli


def image_concepts(db: Path) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT image_id, concept_id, pixels FROM image_concepts").fetchall()
    con.close()
    return {(i, c): p for i, c, p in rows}


def test_reader_matches_truth(tmp_path, edge_broden):
    root, truth = edge_broden
    db = tmp_path / "t.duckdb"
    api.add_dataset(root, "edge", db)
    assert image_concepts(db) == truth


def test_metadata_sizes_categories_and_levels(tmp_path, edge_broden):
    root, _ = edge_broden
    db = tmp_path / "t.duckdb"
    api.add_dataset(root, "edge", db)
    con = duckdb.connect(str(db), read_only=True)
    images = con.execute("SELECT image_id, split, ih, iw, sh, sw FROM images ORDER BY image_id").fetchall()
    assert images[1] == (1, "val", 33, 47, 17, 23)
    assert images[3] == (3, "val", 21, 35, 11, 18)
    concepts = {
        r[0]: r[1:] for r in con.execute("SELECT concept_id, category, categories, level FROM concepts").fetchall()
    }
    assert concepts[300] == ("object", ["material", "object"], "pixel")  # primary = the larger count
    assert concepts[5][2] == "image" and concepts[7][2] == "image"
    assert concepts[301] == ("part", ["part"], "pixel")
    assert con.execute("SELECT n_images, n_concepts FROM datasets").fetchall() == [(4, 8)]


def test_parse_categories():
    assert parse_categories("material(36);object(3)") == ("material", ("material", "object"))
    assert parse_categories("object(3);material(36)") == ("material", ("object", "material"))
    assert parse_categories("scene") == ("scene", ("scene",))


def test_readd_same_path_is_noop_and_other_path_is_refused(tmp_path, edge_broden, synthetic_dir):
    root, truth = edge_broden
    db = tmp_path / "t.duckdb"
    first = api.add_dataset(root, "edge", db)
    assert api.add_dataset(root, "edge", db) == first
    assert len(image_concepts(db)) == len(truth)
    with pytest.raises(N2vdbError, match="taken"):
        api.add_dataset(synthetic_dir, "edge", db)


def test_concept_masks_or_over_part_channels(edge_broden):
    root, truth = edge_broden
    dataset = BrodenDataset.open(root)
    ids, masks = dataset.masks(dataset.rows[0])
    counts = dict(zip(ids.tolist(), masks.sum(axis=(1, 2)).tolist()))
    assert counts == {c: n for (i, c), n in truth.items() if i == 0}


def _cli(*args, env=None):
    return run_cli(*args, env=env)


def _break(root: Path, case: str) -> None:
    index = root / "index.csv"
    lines = index.read_text().splitlines()
    if case == "missing index":
        index.unlink()
    elif case == "malformed row":
        lines[2] = lines[2].split(",")[0] + ",train,notanumber"
        index.write_text("\n".join(lines) + "\n")
    elif case == "bad size":
        cells = lines[1].split(",")
        cells[2] = "x"
        lines[1] = ",".join(cells)
        index.write_text("\n".join(lines) + "\n")
    elif case == "corrupt png":
        (root / "images" / "set" / "002_object.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif case == "unknown label":
        label = root / "label.csv"
        label.write_text("\n".join(l for l in label.read_text().splitlines() if not l.startswith("302,")) + "\n")
    elif case == "missing mask":
        (root / "images" / "set" / "001_color.png").unlink()


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing index", "no index.csv"),
        ("malformed row", "line 3"),
        ("bad size", "expected an integer"),
        ("corrupt png", "cannot be decoded"),
        ("unknown label", "label 302 missing from label.csv"),
        ("missing mask", "is missing"),
    ],
)
def test_bad_dataset_is_one_line_and_leaves_db_unchanged(tmp_path, edge_broden, case, message):
    root, _ = edge_broden
    db = tmp_path / "t.duckdb"
    api.add_dataset(root, "first", db)  # a dataset already there must survive untouched
    before = image_concepts(db)
    other = tmp_path / "broken"
    import shutil

    shutil.copytree(root, other)
    _break(other, case)
    result = _cli("data", "add", str(other), "--name", "broken", "--db", str(db))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert image_concepts(db) == before
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT name FROM datasets").fetchall() == [("first",)]


def test_missing_directory(tmp_path):
    result = _cli("data", "add", str(tmp_path / "nope"), "--name", "x", "--db", str(tmp_path / "t.duckdb"))
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_import_uses_worker_pool_for_larger_sets(tmp_path, synthetic_dir):
    """80 images pass the pool threshold: the pooled path must give the serial path's rows."""
    from n2vdb.data import importer
    from n2vdb.store import write_connection

    dataset = BrodenDataset.open(synthetic_dir)
    assert importer._pool_size(len(dataset.rows)) > 0
    db = tmp_path / "t.duckdb"
    api.add_dataset(synthetic_dir, "s", db)
    got = image_concepts(db)
    expected = {}
    for row in dataset.rows:
        ids, masks = dataset.masks(row)
        for c, n in zip(ids, masks.sum(axis=(1, 2))):
            expected[(row.image_id, int(c))] = int(n)
    assert got == expected
    with pytest.raises(DatasetError):
        with write_connection(db) as con:
            importer.require_dataset(con, "absent")


def test_fetch_offline_fails_fast_with_instructions(tmp_path):
    result = _cli("data", "fetch", "broden1_227", "--dir", str(tmp_path), "--db", str(tmp_path / "t.duckdb"))
    assert result.returncode == 1
    assert "http://netdissect.csail.mit.edu/data/broden1_227.zip" in result.stderr
    assert str(tmp_path) in result.stderr.replace("\n", "")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("honours_range", [True, False], ids=["server resumes", "server starts over"])
def test_fetch_resumes_a_partial_download_then_verifies_and_unpacks(tmp_path, edge_broden, monkeypatch, honours_range):
    """A real HTTP server on localhost and a .zip.part holding the archive's first half: fetch asks
    for the rest (Range), appends a 206, rewrites on a 200, then checks the zip and unpacks it."""
    import shutil
    import threading
    import zipfile
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from n2vdb.data import fetch

    root, _ = edge_broden
    source = tmp_path / "server"
    shutil.copytree(root, source / "broden1_227")
    archive = tmp_path / "broden1_227.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in (source).rglob("*"):
            zipped.write(path, path.relative_to(source))
    body = archive.read_bytes()
    asked = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append((self.path, self.headers.get("Range")))
            start = int(self.headers["Range"][len("bytes=") : -1]) if honours_range and self.headers["Range"] else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(fetch, "BASE_URL", f"http://127.0.0.1:{server.server_port}/data")
        for proxy in ("http_proxy", "HTTP_PROXY"):  # straight to localhost
            monkeypatch.delenv(proxy, raising=False)
        (tmp_path / "data").mkdir()
        half = len(body) // 2
        (tmp_path / "data" / "broden1_227.zip.part").write_bytes(body[:half])
        out = fetch.fetch("broden1_227", tmp_path / "data")
    finally:
        server.shutdown()
        server.server_close()
    assert asked == [("/data/broden1_227.zip", f"bytes={half}-")]
    assert (tmp_path / "data" / "broden1_227.zip").read_bytes() == body  # appended, or written anew
    assert not (tmp_path / "data" / "broden1_227.zip.part").exists()
    assert BrodenDataset.open(out).rows[0].image == "set/000.jpg"
    np.testing.assert_equal(len(list((out / "images" / "set").glob("*.png"))), 12)
