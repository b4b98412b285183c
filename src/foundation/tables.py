"""Tolerant CSV/TSV reading: the records of a table, each malformed row reported in its place instead of
shifting the columns of the rows after it. The trainer's CSV dataset and the cascade gallery read their
tables by these same rules, so they live here rather than in either of them."""
from __future__ import annotations

import csv
from typing import Iterable, Iterator, List, Optional, Tuple

from foundation.errors import DataError

# A quoted CSV field may hold newlines (a caption of several lines); a record spanning more lines than
# this is taken for an unterminated quote, which would otherwise swallow the rows after it.
MAX_RECORD_LINES = 16

# (line number, fields or None, what is wrong or ""): one record of a table, see table_records
Record = Tuple[int, Optional[List[str]], str]


def uses_quotes(sep: str, quoting: str = "auto") -> bool:
    """Whether fields may be quoted: "csv" yes, "none" no, "auto": yes unless tab-separated (CC3M-style
    TSVs carry captions with unbalanced quotes; a tab inside a TSV field is not allowed instead)."""
    if quoting not in ("auto", "csv", "none"):
        raise DataError(f"--csv-quoting {quoting!r}: one of auto, csv, none")
    return quoting == "csv" or (quoting == "auto" and sep != "\t")


def table_records(lines: Iterable[str], sep: str, quoted: bool) -> Iterator[Record]:
    """The records of a table, header first, empty lines left out. A row whose field count differs from
    the header's, or that cannot be parsed, comes as (its first line, None, why): it is skipped without
    shifting any other row's columns. `lines`: the file's physical lines, line ends kept (newline="").

    Quoted: standard CSV (RFC 4180 / Excel: a field in double quotes may hold the separator, newlines,
    and "" for a quote). Not quoted: every line is one row split at `sep`, quotes are plain characters."""
    if not quoted:
        yield from _plain_records(lines, sep)
        return
    if len(sep) != 1:
        raise DataError(f"a quoted CSV needs a one-character separator, not {sep!r} (or --csv-quoting none)")
    source = _Lines(lines)
    reader = csv.reader(source, delimiter=sep, quotechar='"', doublequote=True, strict=True)
    width, number = None, 1  # number: the line the next record starts on
    while True:
        source.taken = []
        try:
            fields, problem = next(reader), ""
        except StopIteration:
            return
        except (csv.Error, _RecordTooLong) as error:
            fields, problem = None, f"cannot be parsed as CSV ({error})"
        taken = len(source.taken)
        if fields == []:  # an empty line
            number += 1
            continue
        if fields is not None and width is not None and len(fields) != width:
            fields, problem = None, (f"{len(fields)} fields where the header has {width} (a separator "
                                     f"inside a field that is not quoted?)")
        if fields is None and taken > 1:
            # blame the first line only and read again from the next: an unterminated quote there must
            # not take the rows after it along
            source.give_back(source.taken[1:])
            taken = 1
        if fields is not None and width is None:
            width = len(fields)
        yield number, fields, problem
        number += taken


def _plain_records(lines: Iterable[str], sep: str) -> Iterator[Record]:
    width = None
    for number, line in enumerate(lines, 1):
        text = line.rstrip("\r\n")
        if not text:  # an empty line is no row (as pandas read them before); "\t" is a row, a bad one
            continue
        fields = text.split(sep)
        if width is None:
            width = len(fields)
        elif len(fields) != width:
            hint = " (a tab inside a field? TSV fields are not quoted)" if sep == "\t" else ""
            yield number, None, f"{len(fields)} fields where the header has {width}{hint}"
            continue
        yield number, fields, ""


class _RecordTooLong(Exception):
    def __str__(self) -> str:
        return f"a quoted field runs over more than {MAX_RECORD_LINES} lines: an unterminated quote?"


class _Lines:
    """An iterator over lines that remembers what the current record took and can be given lines back,
    so that the CSV reader can read them again after a bad record."""

    def __init__(self, lines: Iterable[str]):
        self._lines, self._back, self.taken = iter(lines), [], []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if len(self.taken) == MAX_RECORD_LINES:
            raise _RecordTooLong()
        line = self._back.pop() if self._back else next(self._lines)
        self.taken.append(line)
        return line

    def give_back(self, lines: List[str]) -> None:
        self._back.extend(reversed(lines))
