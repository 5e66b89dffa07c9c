"""Memory at size: the example cache keeps a fixed budget in memory and spills the rest to a file."""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

from n2vdb.embed import segmentation
from n2vdb.embed.examples import CachedBlocks, SegExample, cache_budget, cached
from n2vdb.errors import N2vdbError


def examples_of(n=90, k=6, size=5, seed=0, shuffled=True):
    """Images whose concept 7 is the OR of filters 1 and 3 and concept 8 is filter 0; a third of
    them are 7 x 7 (another segmentation shape), and they arrive out of image-id order."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        s = size + 2 * (i % 3 == 0)
        binary = torch.rand(k, s, s, generator=gen) < 0.15
        ids, masks = [], []
        for concept, mask in ((7, binary[1] | binary[3]), (8, binary[0])):
            if mask.any():
                ids.append(concept)
                masks.append(mask)
        stack = torch.stack(masks) if masks else torch.zeros(0, s, s, dtype=torch.bool)
        out.append(SegExample(i, "train" if i % 4 else "val", binary, np.array(ids, np.int64), stack))
    if shuffled:
        order = torch.randperm(n, generator=gen).tolist()
        out = [out[i] for i in order]
    return out


def train(source):
    return segmentation.train(source, [7, 8], 6, epochs=3, lr=0.05, batch_size=4, seed=1)


def test_spilled_cache_trains_to_the_same_weights_as_one_in_memory():
    examples = examples_of()
    in_memory = cached(lambda: iter(examples), budget_bytes=1 << 30, max_images=16)
    spilled = cached(lambda: iter(examples), budget_bytes=0, max_images=16)
    partly = cached(lambda: iter(examples), budget_bytes=in_memory.nbytes // 2, max_images=16)
    assert in_memory.spilled_bytes == 0 and spilled.spilled_bytes == spilled.nbytes == in_memory.nbytes
    # a budget that holds some blocks but not all spills them all: none is kept beside the one read back
    assert partly.spilled_bytes == partly.nbytes == in_memory.nbytes
    # every example comes back from the file as it went in
    back = {ex.image_id: ex for ex in spilled()}
    assert sorted(back) == list(range(len(examples)))
    for ex in examples:
        got = back[ex.image_id]
        assert got.split == ex.split and list(got.concept_ids) == list(ex.concept_ids)
        assert torch.equal(got.binary, ex.binary) and torch.equal(got.masks, ex.masks)
    a, b, c = train(in_memory), train(spilled), train(partly)
    for other in (b, c):
        assert torch.equal(a.weights, other.weights)
        np.testing.assert_array_equal(a.val_iou, other.val_iou)
        np.testing.assert_array_equal(a.train_iou, other.train_iou)
    # the weights do learn the planted concepts, so the comparison is not between two untrained sets
    assert set(a.weights[:, 0].topk(2).indices.tolist()) == {1, 3}


def test_blocks_are_sorted_by_image_and_bounded():
    examples = examples_of(n=40)
    packed = cached(lambda: iter(examples), budget_bytes=0, max_images=8)
    ids = [b.image_ids.copy() for b in packed.blocks]
    assert all(len(i) <= 8 for i in ids)
    assert all(np.all(np.diff(i) > 0) for i in ids)
    assert sorted(i for block in ids for i in block.tolist()) == list(range(40))


def test_one_spilled_block_in_memory_at_a_time():
    """A spilled block's arrays go when the next block is asked for, although the caller still holds
    the block (a loop variable): a stale block fails loudly instead of being read; blocks kept in
    memory stay whole."""
    examples = examples_of(n=40)
    for budget, stale_fails in ((0, True), (1 << 30, False)):
        packed = cached(lambda: iter(examples), budget_bytes=budget, max_images=8)
        previous = None
        for block in packed.blocks:
            if previous is not None:
                if stale_fails:
                    with pytest.raises(AttributeError):
                        previous.mask_bits  # noqa: B018
                else:
                    assert len(previous.mask_bits) == len(previous.pair_image)
            assert len(block.mask_bits) == len(block.pair_image) > 0
            previous = block
        packed.close()


def test_spill_file_is_anonymous_and_closed(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    examples = examples_of(n=30)
    packed = cached(lambda: iter(examples), budget_bytes=0)
    assert isinstance(packed, CachedBlocks) and packed.spilled_bytes > 0
    assert list(tmp_path.iterdir()) == []  # unlinked at creation: nothing is left behind by any exit
    fd = packed._spill.fileno()
    assert os.fstat(fd).st_size >= packed.spilled_bytes
    packed.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_spill_is_closed_when_decoding_fails(monkeypatch):
    import tempfile

    opened = []
    real = tempfile.TemporaryFile

    def tracking(*args, **kwargs):
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(tempfile, "TemporaryFile", tracking)

    def failing():
        yield from examples_of(n=20, shuffled=False)
        raise RuntimeError("mask file unreadable")

    with pytest.raises(RuntimeError):
        cached(failing, budget_bytes=0, max_images=4)
    assert len(opened) == 1 and opened[0].closed


def test_cache_budget_from_environment(monkeypatch):
    monkeypatch.delenv("N2VDB_CACHE_MEMORY", raising=False)
    assert cache_budget() == 64 << 20
    for text, expected in (("1GB", 1 << 30), ("64mb", 64 << 20), ("0", 0), ("512KiB", 512 << 10)):
        monkeypatch.setenv("N2VDB_CACHE_MEMORY", text)
        assert cache_budget() == expected
    monkeypatch.setenv("N2VDB_CACHE_MEMORY", "lots")
    with pytest.raises(N2vdbError, match="N2VDB_CACHE_MEMORY"):
        cache_budget()


def _limit_of(value: str) -> str:
    with duckdb.connect(":memory:", config={"memory_limit": value}) as con:
        return con.execute("SELECT current_setting('memory_limit')").fetchone()[0]


def test_writer_and_readers_get_their_own_duckdb_budgets(tmp_path, monkeypatch):
    from n2vdb.store.connection import connect

    monkeypatch.delenv("N2VDB_DUCKDB_MEMORY", raising=False)
    monkeypatch.delenv("N2VDB_DUCKDB_WRITER_MEMORY", raising=False)
    db = tmp_path / "m.duckdb"
    for env, expected_writer, expected_reader in ((None, "1GB", "1GB"), ("48MB", "48MB", "1GB")):
        if env:
            monkeypatch.setenv("N2VDB_DUCKDB_WRITER_MEMORY", env)
        con = connect(db, read_only=False)
        assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] == _limit_of(expected_writer)
        con.close()
        con = connect(db, read_only=True)
        assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] == _limit_of(expected_reader)
        con.close()


def test_an_ingests_reads_get_the_ingest_budget(tmp_path, monkeypatch):
    """Store.reading() (an ingest's thresholds, IoU and training scans) opens with N2VDB_DUCKDB_INGEST_MEMORY
    and one DuckDB thread, a plain reader with N2VDB_DUCKDB_MEMORY and DuckDB's default threads."""
    from n2vdb.store.connection import connect
    from n2vdb.store.sessions import Store

    for name in ("N2VDB_DUCKDB_MEMORY", "N2VDB_DUCKDB_INGEST_MEMORY"):
        monkeypatch.delenv(name, raising=False)
    db = tmp_path / "m.duckdb"
    connect(db, read_only=False).close()
    for env, expected in ((None, "64MB"), ("96MB", "96MB")):
        if env:
            monkeypatch.setenv("N2VDB_DUCKDB_INGEST_MEMORY", env)
        with Store(db).reading() as con:
            assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] == _limit_of(expected)
            assert con.execute("SELECT current_setting('threads')").fetchone()[0] == 1  # windows: no workers
        con = connect(db, read_only=True)
        assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] == _limit_of("1GB")
        default = duckdb.connect().execute("SELECT current_setting('threads')").fetchone()[0]
        assert con.execute("SELECT current_setting('threads')").fetchone()[0] == default
        con.close()


def test_activation_reads_fit_a_budget_smaller_than_one_scan_vector(tmp_path, monkeypatch):
    """iter_codes and pooled read the activations in windows of BATCH rows, written without ZSTD: under
    a DuckDB budget of 24MB they stream 2,100 rows of 16 KB codes (one 2,048-row scan vector of them
    is 34 MB: the single scan iter_codes made before runs out of memory here), every row as written,
    in storage order, and pooled in image-id order."""
    from n2vdb import activations as acts_store
    from n2vdb.store import write_connection
    from n2vdb.store.connection import connect

    db, shape, n = tmp_path / "big.duckdb", (64, 16, 16), 2100
    rng = np.random.default_rng(0)
    order = rng.permutation(n)  # stored out of image-id order
    with write_connection(db) as con:
        for start in range(0, n, 300):
            ids = order[start : start + 300]
            codes = rng.integers(0, 256, (len(ids), *shape), dtype=np.uint8)
            codes[:, ::2] = 0  # compressible, as post-ReLU maps are
            scales = ids[:, None].astype(np.float32) + np.zeros((1, shape[0]), np.float32)
            acts_store.write(con, acts_store.to_arrow(1, ids, codes, scales, scales / 2))
        compressions = {
            r[0]
            for r in con.execute(
                "SELECT DISTINCT compression FROM pragma_storage_info('activations') WHERE column_name = 'codes'"
                " AND segment_type = 'BLOB'"
            ).fetchall()
        }
    assert "ZSTD" not in compressions
    monkeypatch.setenv("N2VDB_DUCKDB_MEMORY", "24MB")
    con = connect(db, read_only=True)
    try:
        seen = []
        for ids, codes, scales in acts_store.iter_codes(con, 1, shape, batch=64):
            assert len(ids) <= 64 and codes.shape[1:] == shape
            assert np.array_equal(scales[:, 0], ids.astype(np.float32)) and not codes[:, ::2].any()
            seen.extend(ids.tolist())
        assert seen == order.tolist() == acts_store.stored_order(con, 1)
        some = [int(i) for i in order[::97]]
        picked = [int(i) for ids, _, _ in acts_store.iter_codes(con, 1, shape, some[::-1], batch=8) for i in ids]
        assert picked == some  # storage order, whatever order they were asked in
        ids, means = acts_store.pooled(con, 1)
        assert ids.tolist() == list(range(n)) and np.array_equal(means[:, 0], np.arange(n, dtype=np.float32) / 2)
    finally:
        con.close()


_HEAP_PROBE = """
import ctypes, sys
import numpy as np
from n2vdb import heap
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
for mode in sys.argv[2:]:
    {
        "bounded": heap.bound_freed_memory,
        "training": lambda: heap.bound_freed_memory("segmentation"),
        "batches": heap.keep_batch_buffers,
    }[mode]()
size = int(sys.argv[1]) << 20
big = np.ones(size + (2 << 20), np.uint8)  # mmapped, then freed: glibc's own rule raises its threshold past SIZE
del big
before = libc.mallinfo2().hblkhd
batch = np.ones(size, np.uint8)
placed = "mapped" if libc.mallinfo2().hblkhd - before >= size else "heap"
del batch
def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096
kept = resident()
heap.bound_freed_memory()  # hands back what keep_batch_buffers() kept
print(placed, "released" if kept - resident() >= size // 2 else "kept")
"""


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
def test_heap_policy_maps_freed_arrays_except_the_forward_pass_batches(monkeypatch):
    """After heap.bound_freed_memory(), a 6 MB array allocated after a larger one was freed is its own
    mapping (returned whole on free), not heap space that stays resident once freed (without it,
    glibc's moving threshold puts it in the heap); after heap.keep_batch_buffers() a 20 MB one comes
    from the heap, to be reused batch after batch, until the next stage bounds the heap again and the
    freed heap goes back to the system. A training stage maps arrays from 1 MB: a 2 MB one is heap
    space in the other stages, its own mapping in segmentation's."""
    import subprocess
    import sys

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)

    def placed(size_mb: int, *modes: str) -> str:
        command = [sys.executable, "-c", _HEAP_PROBE, str(size_mb), *modes]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    assert placed(6) == "heap kept" and placed(6, "bounded") == "mapped kept"
    assert placed(20, "bounded") == "mapped kept" and placed(20, "batches") == "heap released"
    assert placed(6, "batches", "bounded") == "mapped kept"
    assert placed(2, "bounded") == "heap kept" and placed(2, "training") == "mapped kept"


@pytest.mark.parametrize("binary", [pa.binary(), pa.large_binary()])
def test_blob_rows_read_every_chunk_and_slice(binary):
    """Arrow's data buffers read as rows, across chunks and from a sliced chunk (its offset), and
    blobs of the wrong length refused."""
    from n2vdb.activations import _blob_rows

    rows = [bytes([i] * 6) for i in range(7)]
    column = pa.chunked_array([pa.array(rows[:3], binary), pa.array(rows[2:], binary).slice(1)])
    got = _blob_rows(column, 6)
    np.testing.assert_array_equal(got, np.repeat(np.arange(7, dtype=np.uint8)[:, None], 6, axis=1))
    with pytest.raises(N2vdbError, match="6 bytes"):
        _blob_rows(pa.chunked_array([pa.array([b"abc"], binary)]), 6)


def test_extraction_sessions_write_each_row_once(tmp_path):
    """Extraction's write sessions (Store.sessions) each checkpoint as they close. DuckDB's vacuum
    would merge each session's small row group into the trailing ones, rewriting (and holding in
    memory) every row since the last full row group at each close, which frees the blocks they were
    in. With it off, 40 one-batch sessions of 16 KB codes free next to nothing: each row is written
    once, and stays as written."""
    from n2vdb import activations as acts_store
    from n2vdb.store import write_connection
    from n2vdb.store.sessions import Store

    db, shape, sessions, rows = tmp_path / "x.duckdb", (64, 16, 16), 40, 32
    with write_connection(db):
        pass  # the schema
    rng = np.random.default_rng(0)
    with Store(db).sessions(hold_s=0.0) as writer:  # every batch its own session, and checkpoint
        for start in range(0, sessions * rows, rows):
            ids = np.arange(start, start + rows)
            codes = rng.integers(0, 256, (rows, *shape), dtype=np.uint8)
            scales = np.ones((rows, shape[0]), np.float32)
            acts_store.write(writer.connection(), acts_store.to_arrow(1, ids, codes, scales, scales))
    with Store(db).reading() as con:
        block, free = con.execute("SELECT block_size, free_blocks FROM pragma_database_size()").fetchone()
        assert free * block < 0.05 * sessions * rows * np.prod(shape)  # measured: 1.0x with vacuum on
        assert acts_store.stored_order(con, 1) == list(range(sessions * rows))
