"""File datasets without a launcher: headers, units, row identity and splits, bad values named by
file and line/row, the global facts of the sharded read, and the streamed training order."""
import itertools
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hvd_train.config.options import TrainConfig
from hvd_train.data import sharding, sources, splitting, stream
from hvd_train.data.interface import DataError


def write(tmp_path, text, name="d.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def read_all(dataset, label, columns=None):
    src = sources.open_source(dataset, label)
    parts = [piece for unit in src.units for piece in sources.read_unit(src, unit, columns)]
    return src, np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def test_csv_features_and_labels_any_position(tmp_path):
    src, x, y = read_all("csv:" + write(tmp_path, "y,f1,f2\n3,1.5,2\n7,0.5,1\n3,1,1\n"), "y")
    assert src.features == ("f1", "f2") and y.tolist() == ["3", "7", "3"]
    assert x.tolist() == [[1.5, 2], [0.5, 1], [1, 1]]


def test_read_selected_columns_by_name(tmp_path):
    _, x, _ = read_all("csv:" + write(tmp_path, "b,label,a\n2,x,1\n4,y,3\n"), "", ["a", "b"])
    assert x.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(DataError, match="lacks column"):
        read_all("csv:" + write(tmp_path, "b,label,a\n2,x,1\n"), "", ["a", "c"])


@pytest.mark.parametrize("text,message", [
    ("", "is empty"),
    ("a,b\n1,2\n", "label column 'y' not found"),
    ("a,y\n1,x\nfoo,y\n", r"line 3, column 'a': 'foo' is not a number"),
    ("a,y\n1,x\nnan,y\n", "line 3, column 'a': 'nan' is not finite"),
    ("a,y\n1,x\ninf,y\n", "not finite"),
    ("a,y\n1,x\n,y\n", "line 3, column 'a': '' is not a number"),
    ("a,y\n1,x\n2\n", "line 3: 1 fields, header has 2"),
    ("a,y\n1,x\n\n\nz,x\n", "line 5, column 'a'"),  # blank lines still count
    ("y\n1\n2\n", "no feature columns"),
    ("a,a,y\n1,2,x\n", "duplicated column name"),
    ("a,,y\n1,2,x\n", "column\\(s\\) 2 of the header have no name"),
])
def test_csv_errors_name_file_line_and_column(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        read_all("csv:" + write(tmp_path, text), "y")


def test_missing_unreadable_and_mismatched_files(tmp_path):
    with pytest.raises(DataError, match="cannot read CSV .*no such file"):
        sources.open_source(f"csv:{tmp_path}/nope.csv", "y")
    with pytest.raises(DataError, match="holds no \\*.csv files"):
        sources.open_source(f"csv:{tmp_path}", "y")
    with pytest.raises(DataError, match="matches no files"):
        sources.open_source(f"csv:{tmp_path}/*.csv", "y")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="cannot parse CSV"):
        sources.open_source(f"csv:{tmp_path}/bin.csv", "y")
    (tmp_path / "d").mkdir()
    write(tmp_path / "d", "a,y\n1,x\n", "1.csv")
    write(tmp_path / "d", "a,b,y\n1,2,x\n", "2.csv")
    with pytest.raises(DataError, match="2.csv has columns .* but .*1.csv has"):
        sources.open_source(f"csv:{tmp_path}/d", "y")
    (tmp_path / "fake.parquet").write_text("a,y\n")
    with pytest.raises(DataError, match="fake.parquet is not a readable Parquet file"):
        sources.open_source(f"parquet:{tmp_path}/fake.parquet", "y")


def test_parquet_schema_types_and_bad_values(tmp_path):
    pq.write_table(pa.table({"a": [1.0, 2.0], "y": ["u", "v"]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"a": [1, 2], "y": ["u", "v"]}), tmp_path / "2.parquet")
    with pytest.raises(DataError, match="2.parquet has schema \\[a: int64, y: string\\], but .*1.parquet"):
        sources.open_source(f"parquet:{tmp_path}/*.parquet", "y")
    pq.write_table(pa.table({"a": ["x"], "y": ["u"]}), tmp_path / "s.parquet")
    with pytest.raises(DataError, match="feature column 'a' has type string"):
        sources.open_source(f"parquet:{tmp_path}/s.parquet", "y")
    pq.write_table(pa.table({"a": [1.0, 2.0, float("nan")], "y": [1, 2, 1]}), tmp_path / "n.parquet",
                   row_group_size=2)
    with pytest.raises(DataError, match="n.parquet row 3, column 'a': nan is not finite"):
        read_all(f"parquet:{tmp_path}/n.parquet", "y")


def test_a_parquet_selection_keeps_its_rows_as_each_column_is_decoded(tmp_path, monkeypatch):
    # A row group is decoded column by column, each column cut to the selected rows at once (what
    # a rank holds falls with its share); the rows arrive in order, in pieces of READ_BATCH_ROWS.
    x = np.arange(300, dtype=np.float64)
    pq.write_table(pa.table({"a": x, "b": -x, "y": (x % 3).astype(int)}), tmp_path / "p.parquet", row_group_size=120)
    src = sources.open_source(f"parquet:{tmp_path}/p.parquet", "y")
    monkeypatch.setattr(sources, "READ_BATCH_ROWS", 16)
    calls = []

    def every_third(offset, n):
        calls.append((offset, n))
        return (np.arange(offset, offset + n) % 3) == 1

    pieces = [piece for unit in src.units for piece in sources.read_unit(src, unit, select=every_third)]
    got = np.concatenate([p[0] for p in pieces])
    kept = np.concatenate([np.arange(n)[(np.arange(n) % 3) == 1] + 120 * g for g, n in enumerate((120, 120, 60))])
    assert got[:, 0].tolist() == kept.tolist() and got[:, 1].tolist() == (-kept).tolist()
    assert calls == [(0, 120), (0, 120), (0, 60)], "once per row group, before it is decoded"
    assert max(len(p[1]) for p in pieces) == 16
    # A bad value in a selected row names the file's row; one the selection skips is never checked.
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0, float("nan")], "y": [1, 2, 1, 2]}), tmp_path / "n.parquet")
    bad = sources.open_source(f"parquet:{tmp_path}/n.parquet", "y")
    assert len(list(sources.read_unit(bad, bad.units[0], select=lambda o, n: np.arange(n) < 3))[0][1]) == 3
    with pytest.raises(DataError, match="n.parquet row 4, column 'a': nan is not finite"):
        list(sources.read_unit(bad, bad.units[0], select=lambda o, n: np.arange(n) % 2 == 1))


def test_csv_units_cover_every_row_once_whatever_the_cut(tmp_path, monkeypatch):
    rows = [f"{i},{i % 3}\n" for i in range(5000)]
    path = write(tmp_path, "f,y\n" + "".join(rows))
    for unit_bytes in (7, 64, 1000, 1 << 20):
        monkeypatch.setattr(sources, "CSV_UNIT_BYTES", unit_bytes)
        src, x, _ = read_all(f"csv:{path}", "y")
        assert len(src.units) == -(-(os.path.getsize(path) - len("f,y\n")) // unit_bytes)
        assert x[:, 0].tolist() == list(range(5000)), unit_bytes


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_selected_rows_are_the_rows_a_full_read_gives(tmp_path, monkeypatch, ending):
    """A CSV reader that parses only the chosen lines gets exactly those rows of a full read,
    whatever the line ends, blank lines and cut; Parquet filters after decoding, alike."""
    lines = [f"{i},{'abc'[i % 3]}" if i % 7 else "" for i in range(3000)]  # every 7th line blank
    path = write(tmp_path, "f,y" + ending + ending.join(lines))  # no line break after the last row
    pq.write_table(pa.table({"f": [float(i) for i in range(3000)], "y": ["abc"[i % 3] for i in range(3000)]}),
                   tmp_path / "d.parquet", row_group_size=700)
    monkeypatch.setattr(sources, "CSV_UNIT_BYTES", 997)
    for dataset in (f"csv:{path}", f"parquet:{tmp_path}/d.parquet"):
        src = sources.open_source(dataset, "y")
        for unit in src.units:
            full = list(sources.read_unit(src, unit))
            x, y = np.concatenate([p[0] for p in full]), np.concatenate([p[1] for p in full])
            calls = []

            def select(offset, n, calls=calls):
                calls.append((offset, n))
                return (np.arange(offset, offset + n) * 7919) % 3 == 0

            chosen = list(sources.read_unit(src, unit, select=select))
            keep = (np.arange(len(y)) * 7919) % 3 == 0
            assert [offset for offset, _ in calls] == list(np.cumsum([0] + [n for _, n in calls])[:-1])
            assert sum(n for _, n in calls) == len(y), "select sees every row of the unit once"
            assert np.concatenate([p[0] for p in chosen]).tolist() == x[keep].tolist()
            assert np.concatenate([p[1] for p in chosen]).tolist() == y[keep].tolist()


def test_a_row_must_be_one_line(tmp_path):
    path = write(tmp_path, 'f,y\n1,"two\nlines"\n2,b\n')
    with pytest.raises(DataError, match="2 rows parsed from 3 lines near line 2; each row must be one line"):
        read_all(f"csv:{path}", "y")


def test_row_splits_are_deterministic_and_near_the_fractions():
    s = splitting.row_splits(42, 0, 0, 0, 100_000, 0.1, 0.2)
    assert np.array_equal(s, splitting.row_splits(42, 0, 0, 0, 100_000, 0.1, 0.2))
    assert np.array_equal(s[500:700], splitting.row_splits(42, 0, 0, 500, 200, 0.1, 0.2)), "pieces agree"
    shares = np.bincount(s, minlength=3) / len(s)
    assert np.allclose(shares, [0.7, 0.1, 0.2], atol=0.005)
    assert not np.array_equal(s, splitting.row_splits(43, 0, 0, 0, 100_000, 0.1, 0.2))
    assert not np.array_equal(s, splitting.row_splits(42, 1, 0, 0, 100_000, 0.1, 0.2))


def test_moments_merge_exactly():
    x = np.random.default_rng(0).normal(5, 3, size=(1000, 4))
    m = splitting.Moments()
    for part in np.array_split(x, 7):
        m.add(part)
    assert m.n == 1000
    np.testing.assert_allclose(m.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(m.m2 / m.n), x.std(axis=0), rtol=1e-12)


def test_the_mlp_trains_on_a_parquet_source_through_a_single_process_facts_pass(tmp_path):
    """stream.load at world size 1 without a launcher (its collectives on one process)."""
    import horovod.tensorflow as hvd

    hvd.init()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(900, 3))
    for i, part in enumerate(np.array_split(np.arange(900), 3)):
        pq.write_table(pa.table({"a": x[part, 0], "b": x[part, 1], "c": x[part, 2],
                                 "y": np.where(x[part, 0] > 0, "pos", "neg")}), tmp_path / f"{i}.parquet",
                       row_group_size=100)
    config = TrainConfig(dataset=f"parquet:{tmp_path}", label_column="y", batch_size=50, shuffle_buffer=120)
    s = stream.load(config, 0, 1)
    assert (s.n_train + s.n_val + s.n_test, len(s.source.units)) == (900, 9)
    assert s.class_names == ("neg", "pos")
    assert sum(len(y) for _, y in s.eval_pieces("test", 0, 1)) == s.n_test
    assert sum(len(y) for r in (0, 1) for _, y in s.eval_pieces("val", r, 2)) == s.n_val, "shares cover all"
    split = np.concatenate([splitting.row_splits(42, u.file, u.index, 0, 100, 0.1, 0.2) for u in s.source.units])
    np.testing.assert_allclose(s.scaler.mean, x[split == stream.TRAIN].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.scaler.scale, x[split == stream.TRAIN].std(axis=0), rtol=1e-12)
    # The streamed epoch: every training row once, in an order that changes with the epoch; with
    # N ranks, each its share of the same global order.
    expected = np.sort(s.scaler.transform(x[split == stream.TRAIN])[:, 0])
    train = stream.TrainStream(s, 0, 1, 48, shuffle=True, shuffle_buffer=120)
    epochs = [np.concatenate([xb for xb, _, _ in train.epoch_batches(e)]) for e in (0, 1)]
    for e in epochs:
        np.testing.assert_allclose(np.sort(e[:, 0]), expected, rtol=1e-6)
    assert not np.array_equal(epochs[0], epochs[1])
    def by_rows(x):  # a step's rows as a set: ranks owning units of a window hold its rows in their own order
        return x[np.lexsort(x.T[::-1])]

    one = [xb for xb, _, _ in stream.TrainStream(s, 0, 1, 48, shuffle=True, shuffle_buffer=120).epoch_batches(0)]
    # Windows of at least N units are shared by units, each unit read by one rank; others by
    # slices of each step, every unit read by every rank. Here windows of 2, 2, 2 and 3 units (the
    # remainder joins the last): 2 ranks read each unit once, but for the one the 3-unit window's
    # cut falls in (10 reads); 3 ranks read the 2-unit windows 3 times (18) and the last once (3).
    assert [len(w) for w in stream.TrainStream(s, 0, 1, 48, True, 120).windows(0)] == [2, 2, 2, 3]
    for size, units_read in ((2, 10), (3, 21)):
        b = 48 // size
        streams = [stream.TrainStream(s, r, size, b, shuffle=True, shuffle_buffer=120) for r in range(size)]
        ranks = [list(t.epoch_batches(0)) for t in streams]
        assert len({len(steps) for steps in ranks}) == 1, "equal steps"
        for k, batch in enumerate(one):  # N x b trains on the global batches 1 x N*b does
            together = np.concatenate([ranks[r][k][0][ranks[r][k][2] > 0] for r in range(size)])
            np.testing.assert_array_equal(by_rows(together), by_rows(batch))
            # Loss weights n_r * N / n_step: the mean of the ranks' weighted means is the global mean.
            assert all(np.allclose(ranks[r][k][2][ranks[r][k][2] > 0], len(ranks[r][k][2]) * size / len(batch))
                       for r in range(size))
        reads = [[u for share in t.shares(0, t.slices()) for u, _, _ in share.reads] for t in streams]
        assert sum(map(len, reads)) == units_read, reads
        # A rank's share of every step, give or take a few rows; step_rows counts what it trains.
        for r, t in enumerate(streams):
            counts = [int((w > 0).sum()) for _, _, w in ranks[r]]
            assert counts == t.step_rows(0).tolist() == s.step_rows(r, size, config.replace(batch_size=b), 0).tolist()
            assert np.median([abs(c - b) for c in counts[:-1]]) <= 0.1 * b, counts
    # From a position into the epoch (a stop, a resume in another world): the rest of the same
    # order, shared by the ranks, whole windows before the position not read.
    joined = epochs[0]
    for size, position in ((1, 300), (2, 300), (3, 619), (4, len(joined) - 2)):
        feeds = [s.train_feed(r, size, config.replace(batch_size=16), 0, position) for r in range(size)]
        rest = [list(f.stream.epoch_batches(0, position)) for f in feeds]
        assert len({f.steps for f in feeds}) == 1 and all(len(r) == feeds[0].steps for r in rest), "equal steps"
        real = [[xb[wb > 0] for xb, _, wb in r] for r in rest]  # a rank without a sample runs a weight-0 row
        steps = sharding.remaining_steps(len(joined), position, size, 16)
        for k, (start, stop) in enumerate(steps):
            together = np.concatenate([real[r][k] for r in range(size)])
            np.testing.assert_array_equal(by_rows(together), by_rows(joined[start:stop]))
    # The reader process (reader.py) hands over exactly the batches the stream makes, from a
    # position on and across the epoch's end, in chunks, through fewer slots than chunks; closing
    # it ends the process and frees the shared block.
    from hvd_train.data.reader import USAGE, Reader

    def steps_of(chunks):
        for x, y, w, rows in chunks:
            ends = np.cumsum(rows)
            for a, b in zip(ends - rows, ends):
                yield x[a:b], y[a:b], w[a:b]

    train = stream.TrainStream(s, 1, 2, 16, shuffle=True, shuffle_buffer=120)
    count = len(train.slices(300).steps) + len(train.slices(0).steps)
    direct = list(itertools.islice(train.epochs(0, 300), count))
    reader = Reader(train, 0, 300, slots=3)
    block = f"/dev/shm/{reader.block.name}"
    batches = iter(reader)  # held: a generator closed by the garbage collector closes its reader
    fed = list(itertools.islice(steps_of(batches), count))
    assert reader.process.is_alive() and os.path.exists(block)
    reader.close()
    assert not reader.process.is_alive() and not os.path.exists(block)
    assert USAGE[-1]["cpu_s"] > 0, "the reader's CPU time, noted as it closed"
    for a, b in zip(direct, fed, strict=True):
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)
    # A file gone under the run: the reader ends the stream, the training process learns why and
    # then trains on idle steps (one zero row, loss weight 0) until the ranks agree to stop
    # (stopping.agree_feed), so a failure on one rank cannot leave the others in a collective.
    os.remove(tmp_path / "1.parquet")
    train = stream.TrainStream(s, 0, 1, 48, shuffle=False, shuffle_buffer=120)
    steps = len(train.slices(0).steps)
    left = list(itertools.islice(steps_of(Reader(train, 0, 0, slots=2)), steps + 40))
    assert "1.parquet" in train.error
    real = [w for _, _, w in left if w.any()]
    assert len(real) < steps and len(left) == steps + 40
    assert all(len(w) == 1 and not w.any() for _, _, w in left[len(real):]), "idle after the failure"
