"""The README's Performance table is generated from bench/results/ (bench/readme.py), never typed by hand."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme = load("readme")


def check(readme_path: Path, results: Path = BENCH / "results") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / "readme.py"), "--check", "--readme", str(readme_path), "--results", str(results)],
        capture_output=True,
        text=True,
        check=False,
    )


def check_text(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    (tmp_path / "README.md").write_text(text)
    return check(tmp_path / "README.md")


def test_readme_table_is_what_the_committed_results_give():
    text = (ROOT / "README.md").read_text()
    assert readme.rebuilt(text, readme.load_results()) == text
    assert check(ROOT / "README.md").returncode == 0


def test_every_committed_result_has_its_row_with_its_own_headline():
    text = (ROOT / "README.md").read_text()
    block = text[text.index(readme.BEGIN) : text.index(readme.END)]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    results = readme.load_results()
    assert len(rows) == len(results) > 0
    for name, record in results.items():
        row = next(r for r in rows if f"bench/{name}.py" in r)
        assert readme.cell(record["headline"]) in row and record["date"][:10] in row


def test_a_hand_edit_of_the_table_fails_the_check(tmp_path):
    text = readme.rebuilt((ROOT / "README.md").read_text(), readme.load_results())
    assert check_text(tmp_path, text).returncode == 0
    block = text[text.index(readme.BEGIN) : text.index(readme.END)]
    figure = re.search(r"\d+\.\d+x", block).group(0)
    edited = tmp_path / "README.md"
    edited.write_text(text.replace(block, block.replace(figure, "99.9x", 1)))
    done = check(edited)
    assert done.returncode == 1 and "differs" in done.stderr
    # and the generator puts it back
    subprocess.run([sys.executable, str(BENCH / "readme.py"), "--readme", str(edited)], check=True, capture_output=True)
    assert edited.read_text() == text


def test_every_bench_script_with_a_main_has_a_result_or_is_listed():
    scripts = {p.stem for p in BENCH.glob("*.py") if 'if __name__ == "__main__"' in p.read_text()}
    results = set(readme.load_results())
    missing = scripts - results - set(readme.NO_RESULT)
    assert not missing, f"bench scripts without bench/results/NAME.json: {sorted(missing)}"
    assert set(readme.NO_RESULT) <= scripts  # the exemption list names real scripts
    assert set(readme.BENCHES) | set(readme.NO_RESULT) == scripts  # each has a row (and quick arguments) or a reason
    assert results <= set(readme.BENCHES)


def test_save_result_records_command_machine_and_headline(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        common = load("common")
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setattr(sys, "argv", ["/somewhere/bench/extract.py", "--images", "300"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ratio = 1.234
    path = common.save_result("extract", f"{ratio:.2f}x | of a bare pass", {"ratio": ratio}, directory=tmp_path)
    record = json.loads(path.read_text())
    assert path == tmp_path / "extract.json"
    assert record["command"] == "OMP_NUM_THREADS=1 python bench/extract.py --images 300"
    assert record["figures"] == {"ratio": ratio} and record["headline"] == "1.23x | of a bare pass"
    machine = record["machine"]
    assert machine["omp_num_threads"] == "1" and machine["nproc"] >= 1
    assert len(machine["load_start"]) == 3 and len(machine["load_end"]) == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["date"])
    # the generator copies the headline, escaping the | that would split the cell
    row = readme.table({"extract": record}).splitlines()[-1]
    assert row.startswith("| `OMP_NUM_THREADS=1 python bench/extract.py --images 300` |")
    assert "1.23x \\| of a bare pass" in row and row.count(" | ") == 3
    with pytest.raises(ValueError):
        common.save_result("extract", "two\nlines", {}, directory=tmp_path)


def test_a_result_without_a_row_in_benches_is_refused(tmp_path):
    (tmp_path / "mystery.json").write_text(json.dumps({"command": "python bench/mystery.py", "headline": "1x"}))
    done = check(ROOT / "README.md", tmp_path)
    assert done.returncode == 1 and "mystery" in done.stderr and "Traceback" not in done.stderr
