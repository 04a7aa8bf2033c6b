"""Bounded, non-blocking reads of run-directory files (torch-free).

A run directory is written by a job that may still be running, may have died mid-line, or may hold
anything a careless user or a broken disk put there: a FIFO where a log should be, a 1 GiB
metrics.jsonl, a JSON line nested 100k deep. Everything here reads a bounded number of bytes,
opens files without blocking, and turns every problem into a reason string (never an exception
the monitor has not planned for).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterator

CHUNK = 1 << 20                # bytes per read
MAX_LINE = 8 << 20             # a longer "line" is skipped and counted, never held in memory
MAX_TEXT = 300                 # characters of a string value kept for display
MAX_KEYS = 256                 # keys of one record kept for display


class Unreadable(OSError):
    """A file that cannot be used; str() is a short reason such as 'a FIFO, not a regular file'."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading without blocking (a FIFO would block a plain open()); Unreadable else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise Unreadable("missing") from None
    except OSError as e:  # ELOOP (symlink loop), EACCES, ENXIO (a FIFO-like node without a writer)
        raise Unreadable(e.strerror or type(e).__name__) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise Unreadable(f"{kind}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_capped(path: Path, limit: int) -> bytes:
    """The whole file if it is a regular file of at most `limit` bytes; Unreadable otherwise."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise Unreadable(f"{size / 2**20:.0f} MB, larger than the {limit / 2**20:.0f} MB read for it")
        return f.read(limit + 1)[:limit]


def parse_record(raw: bytes) -> dict | None:
    """One JSON-lines record as a dict, or None (not JSON, not an object, nested too deep, not UTF-8)."""
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        return None
    return rec if isinstance(rec, dict) else None


def flat(rec: dict) -> dict[str, Any]:
    """Scalars of a record for display/JSON output: nested values dropped, long strings cut, <= MAX_KEYS keys."""
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if len(out) >= MAX_KEYS:
            break
        if isinstance(v, str):
            out[str(k)[:MAX_TEXT]] = v if len(v) <= MAX_TEXT else v[:MAX_TEXT] + "…"
        elif v is None or isinstance(v, (bool, int, float)):
            out[str(k)[:MAX_TEXT]] = v
    return out


class BackwardLines:
    """Lines of a file from the last to the first, reading at most `budget` bytes (CHUNK at a time).

    Yields (index from the end, 1 = last line; raw bytes without the newline; terminated).
    Setting `want` (byte strings) mid-iteration skips, without splitting, the chunks where no line holds one.
    After iteration: `complete` is True if the whole file was read, `total` is then its line count;
    `overlong` counts lines longer than MAX_LINE (skipped).
    """

    def __init__(self, f: BinaryIO, budget: int):
        self.f, self.budget = f, budget
        self.size = os.fstat(f.fileno()).st_size
        self.complete, self.total, self.overlong, self.read = False, 0, 0, 0
        self.want: tuple[bytes, ...] | None = None  # set while iterating: only lines holding one of these

    def __iter__(self) -> Iterator[tuple[int, bytes, bool]]:
        pos, carry, index, skipping = self.size, b"", 0, False
        last = True  # the next line found is the file's last one (unterminated unless the file ends in '\n')
        while pos > 0 and self.read < self.budget:
            start = max(pos - CHUNK, 0)
            self.f.seek(start)
            chunk = self.f.read(pos - start)
            self.read += len(chunk)
            pos = start
            if skipping:  # inside an overlong line: drop its bytes up to the newline before it
                cut = chunk.rfind(b"\n")
                if cut < 0:
                    continue
                chunk, carry, skipping = chunk[:cut], b"", False
            data = chunk + carry
            if self.want and not last and not skipping and not any(w in data for w in self.want):
                cut = data.find(b"\n")  # no wanted line ends in this chunk: count its lines, keep the partial one
                if cut >= 0:
                    index += data.count(b"\n")
                    carry = data[:cut]
                else:
                    carry = data
                if len(carry) > MAX_LINE:
                    self.overlong, index, carry, skipping = self.overlong + 1, index + 1, b"", True
                continue
            pieces = data.split(b"\n")
            carry = pieces[0]
            for piece in reversed(pieces[1:]):
                if len(piece) > MAX_LINE:  # completed in this chunk but too long to be a record
                    self.overlong, index, last = self.overlong + 1, index + 1, False
                    continue
                if last:
                    last = False
                    if not piece:  # the file ends with '\n'
                        continue
                    index += 1
                    yield index, piece, False  # after the last '\n': unterminated
                    continue
                index += 1
                yield index, piece, True
            if len(carry) > MAX_LINE:
                self.overlong, index, carry, skipping, last = self.overlong + 1, index + 1, b"", True, False
        if pos == 0:
            if not skipping and (carry or not last):
                index += 1
                yield index, carry, not last  # the first line; unterminated only if it is the only one
            self.complete, self.total = True, index


def forward_lines(f: BinaryIO) -> Iterator[bytes]:
    """Complete lines from the start (the unterminated last one included); overlong lines skipped."""
    carry, skipping = b"", False
    while chunk := f.read(CHUNK):
        if skipping:
            cut = chunk.find(b"\n")
            if cut < 0:
                continue
            chunk, skipping = chunk[cut + 1:], False
        pieces = (carry + chunk).split(b"\n")
        carry = pieces.pop()
        yield from (p for p in pieces if len(p) <= MAX_LINE)
        if len(carry) > MAX_LINE:
            carry, skipping = b"", True
    if carry and not skipping and len(carry) <= MAX_LINE:
        yield carry
