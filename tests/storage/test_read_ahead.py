"""The disk tier's batched read-ahead (DiskStore.read_ahead): before a gather touches the map, the reads of every
page its rows lie on are queued at once as merged runs, so a cold table is not read one page fault at a time.
The runs must cover exactly those pages (no page missed, none asked twice, adjacent pages merged), for any row
width and any offset of the table in its file; ConcatStore serves a table in parts exactly like the whole."""

import os
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.storage import mapping, stores
from engram.storage.stores import PAGE, ConcatStore, DiskStore

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux's")


def table_file(tmp_path, rows: int, dim: int, offset: int) -> tuple[str, np.ndarray]:
    values = np.random.default_rng(rows + dim).standard_normal((rows, dim)).astype(np.float32)
    path = tmp_path / f"t{rows}-{dim}-{offset}.bin"
    path.write_bytes(b"\0" * offset + values.tobytes())
    return str(path), values


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3000), dim=st.sampled_from([1, 8, 64, 1000, 3000]), offset=st.integers(0, 9000),
       data=st.data())
def test_the_runs_cover_exactly_the_rows_pages(tmp_path_factory, rows, dim, offset, data):
    path, values = table_file(tmp_path_factory.mktemp("t"), rows, dim, offset)
    wanted = np.array(sorted(data.draw(st.sets(st.integers(0, rows - 1), min_size=1, max_size=200))), dtype=np.int64)
    calls = []
    store = DiskStore(path, rows, dim, offset=offset)
    store._resident = lambda idx: False  # as if the file were cold (it was just written, so it is cached)
    with mock.patch.object(os, "posix_fadvise", lambda fd, start, length, advice: calls.append((start, length, advice))):
        got = store.gather(torch.from_numpy(wanted))
    assert np.array_equal(got.numpy(), values[wanted])
    row_bytes = dim * 4
    pages = {p for r in wanted.tolist() for p in range((offset + r * row_bytes) // PAGE,
                                                      (offset + (r + 1) * row_bytes - 1) // PAGE + 1)}
    asked = [(start // PAGE, (start + length) // PAGE) for start, length, advice in calls]
    assert all(advice == os.POSIX_FADV_WILLNEED and start % PAGE == 0 and length % PAGE == 0
               for start, length, advice in calls)
    covered = [p for a, b in asked for p in range(a, b)]
    assert sorted(covered) == sorted(pages)  # every page once, no other
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(asked, asked[1:]))  # ascending, and adjacent runs merged


def test_scales_are_read_ahead_too_and_it_can_be_turned_off(tmp_path, monkeypatch):
    from engram.storage.formats import row_format

    fmt = row_format("fp8_e4m3", block=32)
    codes, scales = fmt.encode(torch.randn(5000, 64))
    (tmp_path / "c.bin").write_bytes(codes.view(torch.uint8).numpy().tobytes())
    (tmp_path / "s.bin").write_bytes(scales.view(torch.uint8).numpy().tobytes())
    files = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, *rest: files.append(os.readlink(f"/proc/self/fd/{fd}")))
    store = DiskStore(tmp_path / "c.bin", 5000, 64, fmt, tmp_path / "s.bin")
    store._resident = lambda idx: False
    rows = torch.tensor([3, 900, 4999])
    expected = fmt.decode(codes[rows], scales[rows])
    assert torch.equal(store.gather(rows), expected)
    assert {os.path.basename(f) for f in files} == {"c.bin", "s.bin"}
    files.clear()
    store.readahead = False
    assert torch.equal(store.gather(rows), expected) and files == []


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6), data=st.data())
def test_a_table_in_parts_serves_the_rows_of_the_whole(tmp_path_factory, sizes, data):
    directory = tmp_path_factory.mktemp("parts")
    whole = np.random.default_rng(len(sizes)).standard_normal((sum(sizes), 8)).astype(np.float32)
    parts, start = [], 0
    for i, n in enumerate(sizes):
        (directory / f"p{i}.bin").write_bytes(whole[start:start + n].tobytes())
        parts.append(DiskStore(directory / f"p{i}.bin", n, 8))
        start += n
    store = ConcatStore(parts)
    rows = data.draw(st.lists(st.integers(0, sum(sizes) - 1), min_size=1, max_size=40, unique=True))
    rows = torch.tensor(rows)  # any order: the parts answer ascending, the result follows the request
    assert store.num_rows == sum(sizes) and np.array_equal(store.gather(rows).numpy(), whole[rows.numpy()])


def test_parts_of_another_width_are_refused(tmp_path):
    (tmp_path / "a.bin").write_bytes(np.zeros((4, 8), np.float32).tobytes())
    (tmp_path / "b.bin").write_bytes(np.zeros((4, 4), np.float32).tobytes())
    with pytest.raises(ValueError, match="part 1 holds float32 rows of width 4"):
        ConcatStore([DiskStore(tmp_path / "a.bin", 4, 8), DiskStore(tmp_path / "b.bin", 4, 4)])


@pytest.mark.skipif(mapping.LIBC is None, reason="mincore is read through Linux's libc")
def test_a_warm_table_skips_the_read_ahead(tmp_path, monkeypatch):
    path, values = table_file(tmp_path, 20000, 64, 0)
    store = DiskStore(path, 20000, 64)
    rows = torch.arange(0, 20000, 37)
    np.asarray(store.array).sum()  # every page cached and mapped: warm
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: calls.append(a))
    assert torch.equal(store.gather(rows), torch.from_numpy(values[rows.numpy()]))
    assert calls == []  # warm: nothing asked of the kernel

    class NotCached:  # mincore saying no page is in memory: the read-ahead runs
        @staticmethod
        def mincore(address, length, flag):
            flag._obj.value = 0
            return 0
    monkeypatch.setattr(mapping, "LIBC", NotCached)
    store = DiskStore(path, 20000, 64)  # a new store: the first found its table warm and trusts that a while
    assert torch.equal(store.gather(rows), torch.from_numpy(values[rows.numpy()]))
    assert calls


@pytest.mark.parametrize("parts", [1, 3])
def test_residency_and_the_budget_are_checked_at_their_pace(tmp_path, parts):
    """A warm verdict is trusted for the next WARM_TRUST - 1 small requests; a large request and a cold verdict
    are checked every time; the mapped budget is checked once SMALL_REQUEST rows were read since the last check."""
    rows_per_part = 8000
    part_stores = []
    for i in range(parts):
        path, _ = table_file(tmp_path, rows_per_part, 16 + i, 0)  # distinct files
        part_stores.append(DiskStore(path, rows_per_part, 16))
    store = part_stores[0] if parts == 1 else ConcatStore(part_stores)
    checks, budget_checks, verdict = [], [], [True]
    if parts == 1:
        store._resident = lambda idx: checks.append(len(idx)) or verdict[0]
        store.over_budget = lambda: budget_checks.append(1) or False
    else:
        store._sample_warm = lambda idx: checks.append(len(idx)) or verdict[0]
        part_stores[0].over_budget = lambda: budget_checks.append(1) or False
    small = torch.arange(0, 7000, 70)  # 100 rows
    for _ in range(stores.WARM_TRUST * 2):
        store.gather(small)
    assert len(checks) == 2  # one check per WARM_TRUST small requests while warm
    assert len(budget_checks) == 1 + (stores.WARM_TRUST * 2 * 100 - 100) // stores.SMALL_REQUEST
    store.gather(torch.arange(0, 6000, 3))  # 2000 rows: a large request is always checked
    assert len(checks) == 3
    verdict[0] = False  # the table goes cold
    checks.clear()
    for _ in range(stores.WARM_TRUST - 1):  # still trusted from the last warm verdict: noticed on the next one
        store.gather(small)
    assert checks == []
    for _ in range(3):  # cold: every request is checked, until one is found warm
        store.gather(small)
    assert len(checks) == 3


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssFile is Linux's")
def test_gathers_leave_no_table_pages_mapped(tmp_path):
    """Past its budget of mapped file pages, a gather releases the map's pages (the page cache keeps them): the
    process's RSS does not grow with the rows read, whatever size the kernel's page-cache folios are."""
    def rss_file_kb() -> int:
        line = next(x for x in open("/proc/self/status") if x.startswith("RssFile:"))
        return int(line.split()[1])

    rows, dim = 1 << 18, 64  # 64 MiB, freshly written, so its pages sit in the page cache
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        block = np.random.default_rng(0).standard_normal((1 << 12, dim)).astype(np.float32).tobytes()
        for _ in range(rows >> 12):
            f.write(block)
    store = DiskStore(path, rows, dim)
    store.mapped_budget = 0  # this process already maps more than 0 bytes of files: release after every gather
    before = rss_file_kb()
    for seed in range(4):
        wanted = np.unique(np.random.default_rng(seed).integers(0, rows, 4000))
        store.gather(torch.from_numpy(wanted))
    assert rss_file_kb() - before < 8 * 1024  # under 8 MiB of 64: nothing of the table stays mapped


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="statm is Linux's")
def test_a_release_drops_only_what_brings_the_process_under_its_budget(tmp_path, monkeypatch):
    """A table a little larger than the budget stays mostly mapped: a release goes round the map a chunk at a
    time until the process maps one chunk less than its budget, not the whole table (each part released is
    mapped again by later gathers, one fault per row)."""
    monkeypatch.setattr(mapping, "RELEASE_CHUNK", 1 << 20)
    rows, dim = 1 << 16, 256  # 64 MiB
    path = tmp_path / "t.bin"
    path.write_bytes(np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32).tobytes())
    store = DiskStore(path, rows, dim)
    store.mapped_budget = 32 << 20
    mib = lambda: (mapping.mapped_bytes() - store._baseline) / (1 << 20)
    for _ in range(3):  # each time from where the last release stopped
        float(store.array.sum())  # every page of the table mapped
        assert mib() > 60
        store.release_mappings()
        assert 24 < mib() <= 31.5
    store.release_mappings(everything=True)
    assert mib() < 4
    for seed in range(5):  # a gather of SMALL_REQUEST rows or more checks the budget as it ends
        store.gather(torch.from_numpy(np.unique(np.random.default_rng(seed).integers(0, rows, 4000))))
        assert 16 < mib() <= 31.5


def test_an_offloaded_table_follows_the_model_to_its_device(tmp_path):
    from engram.storage import OffloadedEmbedding

    (tmp_path / "t.bin").write_bytes(np.zeros((16, 4), np.float32).tobytes())
    table = OffloadedEmbedding(DiskStore(tmp_path / "t.bin", 16, 4), torch.tensor([0, 8]), torch.device("cpu"),
                               torch.float32)
    table.to("meta")  # any device move: the rows are sent where the offsets went
    assert table.device.type == "meta" and table.offsets.device.type == "meta"
