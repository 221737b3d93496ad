"""Reading users' annotation files record by record: JSONL line by line, JSON arrays streamed.

Neither form is loaded whole: a JSONL file is read one line at a time (blank lines skipped), a
top-level JSON array is decoded one element at a time from a growing buffer, so a multi-GB
annotation file costs the memory of its largest record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

CHUNK = 1 << 20


class BadLine:
    """A JSONL line that is not valid JSON (the converter counts it as ``bad_json``)."""

    def __init__(self, line: int, error: str):
        self.line, self.error = line, error


def _jsonl(path: Path) -> Iterator[object]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadLine(n, str(exc))


def _json_array(path: Path) -> Iterator[object]:
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            chunk = f.read(CHUNK)
            buf, pos = buf[pos:] + chunk, 0
            eof = not chunk
            return bool(chunk)

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise ValueError(f"{path}: expected a JSON list of records (or a .jsonl file, one record per line)")
        pos += 1
        skip_ws()
        if pos < len(buf) and buf[pos] == "]":
            return
        while True:
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    if not fill():
                        raise ValueError(f"{path}: malformed JSON array ({exc})") from exc
            yield item
            pos = end
            skip_ws()
            if pos >= len(buf):
                raise ValueError(f"{path}: the JSON array is not closed")
            if buf[pos] == "]":
                return
            if buf[pos] != ",":
                raise ValueError(f"{path}: expected ',' or ']' between records, found {buf[pos]!r}")
            pos += 1
            skip_ws()


def iter_records(path: str | Path) -> Iterator[object]:
    """The records of a ``.jsonl`` file (a :class:`BadLine` for each unparsable line) or a JSON array."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--json {path}: no such file")
    return _jsonl(path) if path.suffix == ".jsonl" else _json_array(path)
