"""The one mask-decoding pool (data/pool.py): results in item order, from worker processes, and a
dataset error from a worker arrives as itself."""

import os
import time
from functools import partial

import numpy as np
import pytest

from n2vdb.data import importer, pool
from n2vdb.data.broden import BrodenDataset
from n2vdb.errors import DatasetError
from n2vdb.stats import iou, netdissect


def _slow_square(item: int) -> tuple[int, int, int]:
    time.sleep(0.002 * (7 - item % 7))  # later items of a chunk finish first in another worker
    return item, item * item, os.getpid()


def test_results_come_in_item_order_from_worker_processes():
    items = list(range(100))
    got = list(pool.decoded(_slow_square, items, workers=2, chunk=8))
    assert [(i, sq) for i, sq, _ in got] == [(i, i * i) for i in items]
    pids = {pid for _, _, pid in got}
    assert os.getpid() not in pids and len(pids) == 2


def _fails_at_five(item: int) -> int:
    if item == 5:
        raise DatasetError(f"mask {item}.png is missing")
    return item


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_error_in_a_worker_arrives_in_order_as_itself(workers):
    got = []
    with pytest.raises(DatasetError) as raised:
        for item in pool.decoded(_fails_at_five, list(range(40)), workers, chunk=4):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]
    assert str(raised.value) == "mask 5.png is missing"


def test_every_decoder_gives_the_same_in_workers_as_in_process(edge_broden):
    root, truth = edge_broden
    dataset = BrodenDataset.open(root)
    rows = dataset.rows * 5  # enough rows for several chunks
    for decode in (
        lambda workers: iou.iter_masks(dataset, rows, workers),
        lambda workers: iou.iter_label_sides(dataset, rows, workers, (3, 4)),
        lambda workers: netdissect.iter_channels(dataset, rows, list(dataset.categories), workers),
        lambda workers: pool.decoded(
            partial(importer._count_pixels, dataset.root, set(dataset.labels)), rows, workers, chunk=3
        ),
    ):
        serial, parallel = list(decode(0)), list(decode(2))
        assert len(serial) == len(parallel) == len(rows)
        for a, b in zip(serial, parallel):
            assert _flat(a) == _flat(b)
    counted = {
        (image_id, int(c)): int(px)
        for image_id, ids, pixels in pool.decoded(
            partial(importer._count_pixels, dataset.root, set(dataset.labels)), dataset.rows, 2
        )
        for c, px in zip(ids, pixels)
    }
    assert counted == truth  # the importer's pixel counts, decoded in workers, against the fixture's truth


def _flat(value):
    """Anything the decoders yield, as nested plain values to compare."""
    if isinstance(value, (tuple, list)):
        return [_flat(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return [_flat(getattr(value, f)) for f in value.__dataclass_fields__]
    if value is None or isinstance(value, (int, str)):
        return value
    return np.asarray(value).tolist()


def test_a_missing_mask_stops_the_import_with_one_line(tmp_path, edge_broden):
    root, _ = edge_broden
    dataset = BrodenDataset.open(root)
    (root / "images" / dataset.rows[2].masks["object"][0]).unlink()
    rows = dataset.rows * 20
    with pytest.raises(DatasetError) as raised:
        list(pool.decoded(partial(importer._count_pixels, dataset.root, set(dataset.labels)), rows, 2))
    assert "is missing" in str(raised.value) and "\n" not in str(raised.value)
