"""store/behind.write_behind: writes in order in a thread of their own, errors from either side
raised in the caller, and nothing handed over lost."""

import threading

import pytest

from n2vdb.store.behind import write_behind


def test_every_item_is_written_in_order_in_another_thread():
    written, threads = [], set()

    def write(item):
        written.append(item)
        threads.add(threading.get_ident())

    write_behind(write, iter(range(50)), depth=2)
    assert written == list(range(50))
    assert threads and threading.get_ident() not in threads


def test_a_failed_write_stops_the_producer_and_is_raised():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    def write(item):
        if item == 3:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_behind(write, items(), depth=2)
    assert len(produced) < 1000  # it stopped, bounded by the queue's depth


def test_an_interrupted_producer_leaves_what_it_handed_over_written():
    written = []

    def items():
        yield from range(5)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_behind(written.append, items(), depth=2)
    assert written == [0, 1, 2, 3, 4]
