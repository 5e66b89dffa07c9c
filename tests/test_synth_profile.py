"""The broden profile of `n2vdb data synth`: Broden's categories, label counts and density."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from n2vdb.data.broden import BrodenDataset, decode_mask
from n2vdb.data.synth import BRODEN_CATEGORIES, generate_broden, generate_profile
from n2vdb.errors import DatasetError

from helpers import run_cli


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    return generate_broden(tmp_path_factory.mktemp("bp") / "broden", images=40, seed=1, workers=2)


def test_categories_and_label_counts_follow_broden(profile_dir):
    ds = BrodenDataset.open(profile_dir)
    by_category = Counter(label.category for label in ds.labels.values())
    assert dict(by_category) == BRODEN_CATEGORIES
    assert max(ds.labels) > 255  # label numbers use the G channel too
    levels = ds.concept_levels()
    assert {levels[n] for n, lab in ds.labels.items() if lab.category in ("scene", "texture")} == {"image"}
    assert {levels[n] for n, lab in ds.labels.items() if lab.category not in ("scene", "texture")} == {"pixel"}


def test_concepts_per_image_and_sizes(profile_dir):
    ds = BrodenDataset.open(profile_dir)
    levels = ds.concept_levels()
    pixel_counts, overlap = [], 0
    for row in ds.rows:
        assert (row.ih, row.iw, row.sh, row.sw) == (227, 227, 113, 113)
        with Image.open(ds.image_path(row)) as img:
            assert img.size == (227, 227)
        assert len(row.labels["scene"]) == 1
        assert 0 <= len(row.labels.get("texture", ())) <= 2
        assert len(row.masks["part"]) == 2  # part_1 and part_2
        part1, part2 = (decode_mask(profile_dir / "images" / p, (113, 113)) for p in row.masks["part"])
        overlap += int(((part1 > 0) & (part2 > 0)).sum())
        materials = np.unique(decode_mask(profile_dir / "images" / row.masks["material"][0], (113, 113)))
        assert 1 <= len(materials[materials > 0]) <= 4
        ids, masks = ds.masks(row)
        assert masks.shape[1:] == (113, 113)
        pixel_counts.append(sum(levels[int(i)] == "pixel" for i in ids))
    assert overlap > 0  # the two part channels overlap, as Broden's do
    assert 25 <= np.mean(pixel_counts) <= 38


def test_label_frequencies_are_long_tailed_and_counted(profile_dir):
    ds = BrodenDataset.open(profile_dir)
    seen = Counter()
    for row in ds.rows:
        ids, _ = ds.masks(row)
        seen.update(int(i) for i in ids)
    for number, label in ds.labels.items():
        assert (label.frequency or 0) == seen.get(number, 0)
    objects = sorted((seen.get(n, 0) for n, lab in ds.labels.items() if lab.category == "object"), reverse=True)
    assert objects[0] >= 5 * max(1, objects[50]) and objects[-1] == 0


def test_output_does_not_depend_on_worker_count(tmp_path, profile_dir):
    serial = generate_broden(tmp_path / "serial", images=40, seed=1, workers=0)
    assert (serial / "index.csv").read_text() == (profile_dir / "index.csv").read_text()
    assert (serial / "label.csv").read_text() == (profile_dir / "label.csv").read_text()


def test_bad_profile_and_size_fail_cleanly(tmp_path):
    with pytest.raises(DatasetError, match="choose one of"):
        generate_profile(tmp_path / "x", "imagenet")
    with pytest.raises(DatasetError, match="227 px"):
        generate_profile(tmp_path / "y", "broden", size=100)
    result = run_cli("data", "synth", tmp_path / "z", "--profile", "nope", "--name", "", "--db", tmp_path / "d.duckdb")
    assert result.returncode != 0 and "choose one of" in result.stderr and "Traceback" not in result.stderr


def test_cli_writes_the_profile(tmp_path):
    result = run_cli(
        "data",
        "synth",
        tmp_path / "b",
        "--profile",
        "broden",
        "--images",
        "3",
        "--name",
        "",
        "--db",
        tmp_path / "d.duckdb",
    )
    assert result.returncode == 0, result.stderr
    assert len(BrodenDataset.open(tmp_path / "b").rows) == 3
