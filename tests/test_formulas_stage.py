"""`n2vdb formulas` on a stored probe: the stored formulas against compexp's loop run on masks made
independently (PIL's own resize of the stored activations, the dataset's decoded masks), runs keyed
by their settings, one transaction, clean errors."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
from PIL import Image
from test_formulas import reference

from n2vdb import api
from n2vdb.data import importer
from n2vdb.data.broden import BrodenDataset
from n2vdb.store import read_connection

from helpers import run_cli


def _stored(db, run_id):
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute(
        "SELECT filter, formula, score, best_label, best_label_iou FROM unit_formulas WHERE run_id = ?", [run_id]
    ).fetchall()
    con.close()
    return {r[0]: r[1:] for r in rows}


def _name(f, names):
    if hasattr(f, "op"):
        right = f"(NOT {names[f.right.val.val]})" if type(f.right).__name__ == "Not" else names[f.right.val]
        return f"({_name(f.left, names)} {f.op} {right})"
    return names[f.val]


def test_stored_formulas_are_compexps_on_independently_made_masks(db_copy):
    run_id = api.formulas(db=db_copy, beam_size=3, max_length=3)
    stored = _stored(db_copy, run_id)
    with read_connection(db_copy) as con:
        dataset = BrodenDataset.open(importer.dataset_root(con, 1))
        thresholds = [
            t for (t,) in con.execute("SELECT threshold FROM filters WHERE probe_id = 1 ORDER BY filter").fetchall()
        ]
    ids, acts = api.activations(1, db_copy)
    rows = [dataset.rows[i] for i in ids.tolist()]
    shapes = [(r.sh, r.sw) for r in rows]
    names = {n: lab.name for n, lab in dataset.labels.items()}
    label_masks = {n: [np.zeros(s, bool) for s in shapes] for n in dataset.labels}
    for i, row in enumerate(rows):
        concept_ids, masks = dataset.masks(row)
        for c, m in zip(concept_ids.tolist(), masks):
            label_masks[c][i] = m
    label_masks = {n: m for n, m in label_masks.items() if any(x.any() for x in m)}
    checked = 0
    for unit in (0, 7, 100, 201):
        unit_masks = [
            np.asarray(Image.fromarray(acts[i, unit], "F").resize((s[1], s[0]), Image.BILINEAR)) > thresholds[unit]
            for i, s in enumerate(shapes)
        ]
        best, best_label = reference(unit_masks, label_masks, shapes, 3, 3, 1.0)
        if best is None:
            assert unit not in stored
            continue
        formula, score, label, label_iou = stored[unit]
        assert formula == _name(best[0], names) and score == pytest.approx(best[1], abs=1e-15)
        assert label == names[best_label[0].val] and label_iou == pytest.approx(best_label[1], abs=1e-15)
        checked += 1
    assert checked >= 3


def test_runs_are_keyed_by_settings_and_written_whole(db_copy, monkeypatch):
    first = api.formulas(db=db_copy, beam_size=2, max_length=2)
    assert api.formulas(db=db_copy, beam_size=2, max_length=2) == first  # found, not searched again
    train = api.formulas(db=db_copy, beam_size=2, max_length=2, split="train", categories=["color", "object"])
    assert train != first
    con = duckdb.connect(str(db_copy), read_only=True)
    assert con.execute("SELECT count(*) FROM formula_runs").fetchone()[0] == 2
    val = con.execute("SELECT count(*), count(val_iou) FROM formula_beams WHERE run_id = ?", [train]).fetchone()
    assert val[0] > 0 and val[0] == val[1]
    cats = con.execute(
        "SELECT DISTINCT c.category FROM formula_terms t JOIN concepts c USING (concept_id) WHERE t.run_id = ?", [train]
    ).fetchall()
    assert {c for (c,) in cats} <= {"color", "object"}
    timed = con.execute("SELECT count(*) FROM stage_timings WHERE stage = 'formulas'").fetchone()[0]
    con.close()
    assert timed == 1 and all(r["violations"] == 0 for r in api.db_check(db_copy).to_pylist())
    units = api.query("unit-formulas", db_copy, run=first, k=1000).num_rows
    assert units == len(_stored(db_copy, first)) > 0

    # A failure while writing leaves no trace of the run: its rows go in one transaction.
    from n2vdb.store import writer

    real = writer.insert

    def failing(con, table, rows):
        if table == "formula_terms":
            raise RuntimeError("disk full")
        return real(con, table, rows)

    monkeypatch.setattr(writer, "insert", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        api.formulas(db=db_copy, beam_size=4, max_length=2)
    con = duckdb.connect(str(db_copy), read_only=True)
    assert con.execute("SELECT count(*) FROM formula_runs").fetchone()[0] == 2
    assert con.execute("SELECT count(DISTINCT run_id) FROM formula_beams").fetchone()[0] == 2
    con.close()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--categories", "nope"], "--categories names 'nope'"),
        (["--beam", "0"], "--beam must be between 1"),
        (["--split", "val"], "--split 'val'"),
        (["--penalty", "-1"], "--penalty must be a finite number above 0"),
        (["--probe", "9"], "probe 9"),
    ],
)
def test_bad_settings_are_one_line_and_change_nothing(db_copy, args, says):
    before = db_copy.read_bytes()
    result = run_cli("formulas", *args, "--db", str(db_copy))
    assert result.returncode in (1, 2) and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    con = duckdb.connect(str(db_copy), read_only=True)
    assert con.execute("SELECT count(*) FROM formula_runs").fetchone()[0] == 0
    con.close()
    assert before  # the file is still a database (opened above)
