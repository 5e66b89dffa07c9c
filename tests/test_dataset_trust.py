"""A dataset cannot escape its directory, shift under a probe, hold duplicates, or crash the reader
(issue 11, items 2, 3, 7 and the dataset half of 9). Every refusal is one line, a non-zero exit and
a database left byte for byte as it was."""

import hashlib
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import write_image, write_mask

from n2vdb import api
from n2vdb.data import fingerprint, importer
from n2vdb.data.broden import MAX_SIDE, BrodenDataset, dataset_file
from n2vdb.data.names import MAX_STEM, file_stem
from n2vdb.errors import DatasetError, UsageError
from n2vdb.store import write_connection

from helpers import run_cli


def cli(*args, env=None):
    return run_cli(*args, env=env)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(result, message: str, code: int = 1) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr, result.stderr


@pytest.fixture
def registered(tmp_path, edge_broden):
    """A database holding the edge dataset as 'first', and a copy of that dataset to break."""
    root, _ = edge_broden
    db = tmp_path / "t.duckdb"
    api.add_dataset(root, "first", db)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    return db, root, copy


def edit_cell(root: Path, line: int, column: str, value: str) -> None:
    """Set one cell of index.csv (line 2 = first image) to VALUE."""
    lines = (root / "index.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[line - 1].split(",")
    cells[header.index(column)] = value
    lines[line - 1] = ",".join(cells)
    (root / "index.csv").write_text("\n".join(lines) + "\n")


def add_refused(db: Path, directory: Path, message: str, code: int = 1, name: str = "broken") -> None:
    before = digest(db)
    refused(cli("data", "add", directory, "--name", name, "--db", db), message, code)
    assert digest(db) == before


# -- item 2: every path stays inside the dataset directory -------------------------------------------


def _outside(tmp_path: Path) -> Path:
    target = tmp_path / "elsewhere" / "secret.jpg"
    write_image(target, 40, 30, seed=99)
    write_mask(tmp_path / "elsewhere" / "secret.png", np.full((20, 15), 2))
    return target


@pytest.mark.parametrize(
    "case,line,column,message",
    [
        ("image ../", 2, "image", "resolves outside the dataset directory"),
        ("image absolute", 3, "image", "is an absolute path"),
        ("mask absolute", 2, "object", "is an absolute path"),
        ("mask ../", 4, "color", "resolves outside the dataset directory"),
        ("image symlink out", 2, "image", "resolves outside the dataset directory"),
        ("directory symlink out", 2, "image", "resolves outside the dataset directory"),
    ],
)
def test_paths_outside_the_dataset_are_refused_naming_the_row(tmp_path, registered, case, line, column, message):
    db, _, copy = registered
    secret = _outside(tmp_path)
    rel_out = os.path.relpath(secret, copy / "images")
    if case == "image ../":
        edit_cell(copy, line, "image", rel_out)
    elif case == "image absolute":
        edit_cell(copy, line, "image", str(secret))
    elif case == "mask absolute":
        edit_cell(copy, line, "object", str(secret.with_suffix(".png")))
    elif case == "mask ../":
        edit_cell(copy, line, "color", "../../elsewhere/secret.png")
    elif case == "image symlink out":
        (copy / "images" / "set" / "000.jpg").unlink()
        (copy / "images" / "set" / "000.jpg").symlink_to(secret)
    elif case == "directory symlink out":
        # images/set itself leads outside: every path under it escapes although none says '..'
        shutil.move(copy / "images" / "set", tmp_path / "elsewhere" / "set")
        (copy / "images" / "set").symlink_to(tmp_path / "elsewhere" / "set")
    add_refused(db, copy, f"index.csv line {line}, column {column!r}")
    add_refused(db, copy, message)


def test_symlinks_inside_the_dataset_are_fine(tmp_path, registered):
    db, _, copy = registered
    (copy / "images" / "alias.jpg").symlink_to(copy / "images" / "set" / "000.jpg")
    edit_cell(copy, 2, "image", "alias.jpg")
    link = tmp_path / "linked"
    link.symlink_to(copy)  # the directory reached through a symlink is still itself
    api.add_dataset(link, "linked", db)
    assert BrodenDataset.open(link).root == copy.resolve()


def test_read_side_refuses_a_file_swapped_for_a_way_out_after_registration(tmp_path, registered):
    db, _, copy = registered
    api.add_dataset(copy, "copy", db)
    dataset = BrodenDataset.open(copy)
    secret = _outside(tmp_path)
    image = copy / "images" / "set" / "001.jpg"
    image.unlink()
    image.symlink_to(secret)
    with pytest.raises(DatasetError, match="outside the dataset directory"):
        dataset.image_path(dataset.rows[1])
    mask = copy / "images" / "set" / "001_object.png"
    mask.unlink()
    mask.symlink_to(secret.with_suffix(".png"))
    with pytest.raises(DatasetError, match="outside the dataset directory"):
        dataset.masks(dataset.rows[1])
    with pytest.raises(DatasetError, match="line 3, column 'image'"):
        BrodenDataset.open(copy)  # what ingest, merge, show and report open first
    with pytest.raises(DatasetError, match="outside"):
        dataset_file(copy, "../../etc/passwd")


# -- item 3: a registered dataset never shifts under a probe -----------------------------------------


def _remove_row(root: Path, line: int) -> None:
    lines = (root / "index.csv").read_text().splitlines()
    (root / "index.csv").write_text("\n".join(lines[: line - 1] + lines[line:]) + "\n")


CHANGES = {
    "index.csv row removed": (lambda r: _remove_row(r, 3), "index.csv changed"),
    "label.csv renamed a concept": (
        lambda r: (r / "label.csv").write_text((r / "label.csv").read_text().replace(",dog,", ",hound,")),
        "label.csv changed",
    ),
    "category file added": (
        lambda r: (r / "c_color.csv").write_text("code,number,name\n1,1,red-c\n"),
        "c_color.csv was added",
    ),
    "mask replaced": (
        lambda r: write_mask(r / "images" / "set" / "000_object.png", np.full((20, 15), 300)),
        "a mask file changed",
    ),
}


@pytest.mark.parametrize("change", CHANGES)
def test_changed_directory_is_refused_with_what_changed_and_what_to_do(registered, change):
    db, _, copy = registered
    api.add_dataset(copy, "copy", db)
    edit, said = CHANGES[change]
    edit(copy)
    with write_connection(db) as con:
        dataset_id, _ = importer.require_dataset(con, "copy")
        with pytest.raises(DatasetError) as caught:
            importer.verify_unchanged(con, dataset_id, "copy", BrodenDataset.open(copy))
    message = str(caught.value)
    assert said in message and "--name copy-v2" in message and "\n" not in message
    add_refused(db, copy, "changed since it was registered", name="copy")  # re-adding it is no way round


def test_unchanged_directory_verifies_and_readding_is_a_noop(registered):
    db, root, _ = registered
    before = digest(db)
    assert api.add_dataset(root, "first", db) == 1
    assert digest(db) == before
    with write_connection(db) as con:
        importer.verify_unchanged(con, 1, "first", BrodenDataset.open(root))
        rows = con.execute("SELECT file FROM dataset_files WHERE dataset_id = 1 ORDER BY file").fetchall()
    assert rows == [("index.csv",), ("label.csv",), ("masks",)]
    assert fingerprint.take(BrodenDataset.open(root))["index.csv"][0] == digest(root / "index.csv")


def test_datasets_registered_before_fingerprints_are_checked_row_by_row(registered):
    """Migration 0003 leaves old datasets without dataset_files rows: their images and concepts rows
    stand in, so an old database still works and still refuses a shifted index.csv."""
    db, _, copy = registered
    api.add_dataset(copy, "copy", db)
    with write_connection(db) as con:
        con.execute("DELETE FROM dataset_files")
        importer.verify_unchanged(con, 2, "copy", BrodenDataset.open(copy))  # unchanged: accepted
        _remove_row(copy, 3)
        with pytest.raises(DatasetError, match="index.csv lists 3 images, 4 were registered"):
            importer.verify_unchanged(con, 2, "copy", BrodenDataset.open(copy))
        shutil.copy(copy.parent / "edge" / "index.csv", copy / "index.csv")
        (copy / "label.csv").write_text((copy / "label.csv").read_text().replace(",dog,", ",hound,"))
        with pytest.raises(DatasetError, match="label.csv changed"):
            importer.verify_unchanged(con, 2, "copy", BrodenDataset.open(copy))
        (copy / "label.csv").write_text((copy / "label.csv").read_text().replace(",hound,", ",dog,"))
    assert api.add_dataset(copy, "copy", db) == 2  # re-adding an unchanged old dataset records its fingerprint
    with write_connection(db) as con:
        assert importer._recorded(con, 2) == fingerprint.take(BrodenDataset.open(copy))


INGEST = [
    "ingest",
    "alexnet",
    "conv1",
    "--weights",
    "random",
    "--workers",
    "0",
    "--epochs",
    "1",
    "--batch-size",
    "1",
    "--dataset",
    "copy",
]


def tables(db: Path) -> str:
    con = duckdb.connect(str(db), read_only=True)
    out = hashlib.sha256()
    for (table,) in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall():
        out.update(repr(sorted(map(repr, con.execute(f"SELECT * FROM {table}").fetchall()))).encode())
    con.close()
    return out.hexdigest()


def test_following_the_bad_image_advice_resumes_and_editing_index_csv_is_refused(registered):
    """The issue's story: a bad image stops extraction; removing its row (the old advice) would shift
    every later id, so the resume is refused; replacing the file (the new advice) resumes cleanly."""
    db, _, copy = registered
    api.add_dataset(copy, "copy", db)
    image = copy / "images" / "set" / "002.jpg"
    good = image.read_bytes()
    image.write_bytes(b"not a jpeg")
    result = cli(*INGEST, "--db", db)
    refused(result, "replace that file with a readable copy of the same image")
    assert "remove that row" not in result.stderr
    stored = duckdb.connect(str(db), read_only=True)
    assert stored.execute("SELECT count(*) FROM activations").fetchone()[0] == 2  # images 0 and 1
    stored.close()

    saved = copy.parent / "index.saved"
    shutil.copy(copy / "index.csv", saved)
    _remove_row(copy, 4)  # the old advice
    before = digest(db)
    refused(cli(*INGEST, "--db", db), "dataset 'copy' changed since it was registered (index.csv changed)")
    assert digest(db) == before

    shutil.copy(saved, copy / "index.csv")
    image.write_bytes(good)  # the new advice
    result = cli(*INGEST, "--db", db)
    assert result.returncode == 0, result.stderr
    assert not [r for r in api.db_check(db).to_pylist() if r["violations"]]


def test_merge_refuses_shards_over_a_changed_directory(tmp_path, registered):
    db, _, copy = registered
    api.add_dataset(copy, "copy", db)
    api.ingest_shard("alexnet", "conv1", "0/1", tmp_path / "shards", db, dataset="copy", weights="random", workers=0)
    _remove_row(copy, 5)
    before = tables(db)
    result = cli("merge", tmp_path / "shards", "--db", db)
    refused(result, "dataset 'copy' changed since it was registered")
    assert tables(db) == before


# -- item 7: duplicates in dataset files -------------------------------------------------------------


@pytest.mark.parametrize(
    "case,row,message",
    [
        ("duplicate label number", "2,cat,object(1),1,0.5,", "label number 2 appears on lines 4 and 11"),
        ("duplicate concept name", "9,dog,object(1),1,0.5,", "concept name 'dog' is used by labels 2 and 9"),
        (
            "names equal as file names",
            "9,red_c,color(1),1,0.5,",
            "concept names 'red-c' and 'red_c' (lines 3 and 11) collide as file names ('red_c')",
        ),
        ("names equal up to case", "9,Dog,object(1),1,0.5,", "concept names 'dog' and 'Dog'"),
        ("empty concept name", "9,,object(1),1,0.5,", "line 11: malformed row (the name is empty)"),
        ("label number above int32", "2147483648,big,object(1),1,0.5,", "outside 1..2147483647"),
        ("negative label number", "-4,neg,object(1),1,0.5,", "outside 1..2147483647"),
        ("frequency above int32", "9,many,object(1),99999999999,0.5,", "frequency 99999999999 is outside"),
    ],
)
def test_label_csv_duplicates_and_nonsense_are_refused(registered, case, row, message):
    """label.csv as written holds 10 lines (header, the '-' row, 8 labels): ROW becomes line 11."""
    db, _, copy = registered
    with (copy / "label.csv").open("a") as handle:
        handle.write(row + "\n")
    add_refused(db, copy, message)


def test_duplicated_category_column_is_refused(registered):
    db, _, copy = registered
    lines = (copy / "index.csv").read_text().splitlines()
    lines[0] = lines[0].replace(",material,", ",color,")
    (copy / "index.csv").write_text("\n".join(lines) + "\n")
    add_refused(db, copy, "the header names column 'color' more than once")


def test_file_stem_is_the_one_sanitiser_and_stays_unique_and_short():
    assert file_stem("x-y") == file_stem("x_y") == "x_y"
    assert file_stem("traffic light/../x") == "traffic_light____x"
    long_a, long_b = "a" * 300, "a" * 299 + "b"
    assert len(file_stem(long_a).encode()) <= MAX_STEM
    assert file_stem(long_a) != file_stem(long_b)
    assert len(file_stem("é" * 200).encode()) <= MAX_STEM
    from n2vdb.render import report

    assert report.file_stem is file_stem  # the report cards share it


def test_show_concept_names_its_file_with_the_sanitiser(tmp_path, monkeypatch, db_copy):
    monkeypatch.chdir(tmp_path)
    path, _, _ = api.show_concept("red-c", db_copy)
    assert path == Path("n2v_out") / "concept-red_c-segmentation-probe1.png" and path.is_file()


# -- item 9: reading what users actually write -------------------------------------------------------


def test_byte_order_mark_is_read(tmp_path, registered):
    db, root, copy = registered
    for name in ("index.csv", "label.csv"):
        (copy / name).write_bytes(b"\xef\xbb\xbf" + (copy / name).read_bytes())
    plain, marked = BrodenDataset.open(root), BrodenDataset.open(copy)
    assert marked.rows == plain.rows and marked.labels == plain.labels and marked.categories == plain.categories
    api.add_dataset(copy, "bom", db)


def test_unknown_extra_column_is_ignored_and_named(registered):
    db, _, copy = registered
    lines = (copy / "index.csv").read_text().splitlines()
    lines = [lines[0] + ",notes"] + [line + ",looked at by hand; twice" for line in lines[1:]]
    (copy / "index.csv").write_text("\n".join(lines) + "\n")
    result = run_cli("data", "add", copy, "--name", "notes", "--db", db, env={"N2VDB_QUIET": "0"})
    assert result.returncode == 0, result.stderr
    assert "'notes'" in result.stderr and "ignored" in result.stderr
    dataset = BrodenDataset.open(copy)
    assert "notes" not in dataset.categories and dataset.ignored_columns == ["notes"]


@pytest.mark.parametrize(
    "case,message,code",
    [
        ("a file", "is not a directory", 1),
        ("empty name", "a dataset name cannot be empty", 2),
        (
            "segmentation size 1e6",
            f"column 'sh' is 1000000; image and segmentation sizes must lie in 1..{MAX_SIDE} px",
            1,
        ),
        ("label cell above int32", "line 2, column 'scene': label number 99999999999 is above 2147483647", 1),
        ("not UTF-8", "index.csv is not UTF-8 text", 1),
        ("empty image path", "line 2: column 'image' is empty", 1),
    ],
)
def test_friendly_reading(registered, case, message, code):
    db, _, copy = registered
    target, name = copy, "broken"
    if case == "a file":
        target = copy / "index.csv"
    elif case == "empty name":
        name = ""
    elif case == "segmentation size 1e6":
        edit_cell(copy, 5, "sh", "1000000")  # the row without masks: it would allocate ones(1e6, ...)
    elif case == "label cell above int32":
        edit_cell(copy, 2, "scene", "99999999999")
    elif case == "not UTF-8":
        (copy / "index.csv").write_bytes((copy / "index.csv").read_bytes() + b"\xff\xfe,train\n")
    elif case == "empty image path":
        edit_cell(copy, 2, "image", "")
    add_refused(db, target, message, code, name=name)


def test_empty_name_is_refused_by_the_library(tmp_path, edge_broden):
    root, _ = edge_broden
    for name in ("", "   ", "a\nb"):
        with pytest.raises(UsageError):
            api.add_dataset(root, name, tmp_path / "never.duckdb")
        with pytest.raises(UsageError):
            api.synth(tmp_path / "s", images=1, size=16, name=name or "  ", db=tmp_path / "never.duckdb")
    assert not (tmp_path / "never.duckdb").exists() and not (tmp_path / "s").exists()


def test_synth_into_an_unwritable_place_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    refused(
        cli("data", "synth", blocker / "set", "--images", "2", "--db", tmp_path / "t.duckdb"),
        "cannot write the concept set in",
    )
    # N2VDB_HOME that is a file: the built-in set cannot be generated there on first use
    result = cli(
        "ingest",
        "alexnet",
        "conv1",
        "--weights",
        "random",
        "--db",
        tmp_path / "t.duckdb",
        env={"N2VDB_HOME": str(blocker)},
    )
    refused(result, "cannot write the built-in concept set in")
