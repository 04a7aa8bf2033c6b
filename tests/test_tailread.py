"""diffold.tailread: backward/forward line readers agree with a plain split on generated files; no hangs."""
from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from diffold import tailread
from diffold.tailread import BackwardLines, Unreadable, forward_lines, open_regular, parse_record, read_capped


def reference(data: bytes) -> list[tuple[bytes, bool]]:
    """(line, terminated) in file order, as a plain split sees them."""
    pieces = data.split(b"\n")
    out = [(p, True) for p in pieces[:-1]]
    if pieces[-1]:
        out.append((pieces[-1], False))
    return out


def random_file(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(0, 40)):
        parts.append(bytes(rng.choice(b"ab{}\n") for _ in range(rng.choice([0, 1, 3, 7, 20, 60]))))
    return b"".join(parts)


def read_backward(tmp_path, data: bytes):
    """Write data to a file; (path, reference split, the BackwardLines reader, its lines) read without a budget."""
    f = tmp_path / "x"
    f.write_bytes(data)
    with open_regular(f) as fh:
        back = BackwardLines(fh, budget=10 ** 9)
        got = list(back)
    return f, reference(data), back, got


@pytest.mark.parametrize("seed", range(60))
def test_backward_and_forward_lines_match_a_split(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(tailread, "CHUNK", 5)        # many chunk borders inside short lines
    monkeypatch.setattr(tailread, "MAX_LINE", 10 ** 9)
    data = random_file(random.Random(seed))
    f, ref, back, got = read_backward(tmp_path, data)
    assert [(raw, term) for _, raw, term in reversed(got)] == ref
    assert [i for i, *_ in got] == list(range(1, len(ref) + 1)) and back.complete and back.total == len(ref)
    with open_regular(f) as fh:
        assert list(forward_lines(fh)) == [raw for raw, _ in ref]


def test_budget_stops_early_and_overlong_lines_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(tailread, "CHUNK", 8)
    monkeypatch.setattr(tailread, "MAX_LINE", 20)
    f = tmp_path / "x"
    f.write_bytes(b"first\n" + b"x" * 100 + b"\nmid\n" + b"y" * 100 + b"\nlast")
    with open_regular(f) as fh:
        back = BackwardLines(fh, budget=10 ** 9)
        lines = [(i, raw) for i, raw, _ in back]
    assert lines == [(1, b"last"), (3, b"mid"), (5, b"first")] and back.overlong == 2 and back.total == 5
    with open_regular(f) as fh:
        assert list(forward_lines(fh)) == [b"first", b"mid", b"last"]
    with open_regular(f) as fh:
        short = BackwardLines(fh, budget=16)
        assert [raw for _, raw, _ in short] == [b"last"] and not short.complete


def test_fifo_and_other_non_regular_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(pytest.raises(Unreadable, open_regular, fifo)))
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "open_regular blocked on a FIFO"
    assert "FIFO" in str(result[0].value)
    with pytest.raises(Unreadable, match="directory"):
        open_regular(tmp_path)
    with pytest.raises(Unreadable, match="missing"):
        open_regular(tmp_path / "nope")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(Unreadable):
        open_regular(loop)
    with pytest.raises(Unreadable, match="character device"):
        open_regular(Path("/dev/null"))


def test_read_capped_and_parse_record(tmp_path):
    f = tmp_path / "big"
    f.write_bytes(b"x" * 3000)
    with pytest.raises(Unreadable, match="larger than"):
        read_capped(f, 1000)
    assert read_capped(f, 5000) == b"x" * 3000
    assert parse_record(b"[" * 100_000 + b"]" * 100_000) is None          # RecursionError inside json
    assert parse_record(b'{"a": ' * 100_000) is None
    assert parse_record(b"\xff\xfe") is None and parse_record(b"[1]") is None
    assert parse_record(b'{"a": NaN}')["a"] != parse_record(b'{"a": NaN}')["a"]


@pytest.mark.parametrize("seed", range(60))
def test_lines_longer_than_max_line_are_skipped_and_counted(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(tailread, "CHUNK", 5)
    monkeypatch.setattr(tailread, "MAX_LINE", 15)
    f, ref, back, got = read_backward(tmp_path, random_file(random.Random(1000 + seed)))
    assert [(raw, term) for _, raw, term in reversed(got)] == [(r, t) for r, t in ref if len(r) <= 15]
    assert back.overlong == sum(len(r) > 15 for r, _ in ref) and back.total == len(ref)
    expected_index = [len(ref) - i for i, (r, _) in enumerate(ref) if len(r) <= 15]
    assert [i for i, *_ in reversed(got)] == expected_index
    with open_regular(f) as fh:
        assert list(forward_lines(fh)) == [r for r, _ in ref if len(r) <= 15]


@pytest.mark.parametrize("seed", range(60))
def test_want_skips_chunks_but_never_a_wanted_line_or_a_line_number(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(tailread, "CHUNK", 4)
    monkeypatch.setattr(tailread, "MAX_LINE", 10 ** 9)
    data = random_file(random.Random(2000 + seed))
    f = tmp_path / "x"
    f.write_bytes(data)
    ref = reference(data)
    by_index = {len(ref) - i: raw for i, (raw, _) in enumerate(ref)}
    with open_regular(f) as fh:
        back = BackwardLines(fh, budget=10 ** 9)
        got = []
        for i, raw, _ in back:
            got.append((i, raw))
            back.want = (b"a{",)                      # after the newest line: only lines holding 'a{'
    assert all(by_index[i] == raw for i, raw in got)  # every yielded line is real, with its true index
    wanted = {i for i, raw in by_index.items() if b"a{" in raw}
    assert wanted <= {i for i, _ in got} and back.complete and back.total == len(ref)
