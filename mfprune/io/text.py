"""The messages for text files that are not what they should be, shared by every reader of
user text (task data, held-out data): where it fails, in the file's own line and column, and a
hint that fits the encoding the bytes look like."""

from __future__ import annotations

import json

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def encoding_hint(raw: bytes) -> str:
    """How to convert a file that is not UTF-8, judged from its first bytes."""
    head = raw[:512]
    if head.startswith(_UTF16_BOMS) or (len(head) >= 2 and head.count(b"\x00") >= len(head) // 4):
        return "the file is UTF-16: convert it, e.g. `iconv -f utf-16 -t utf-8 IN > OUT`"
    return (
        "convert the file to UTF-8 (`file -i IN` tells its encoding), e.g. for Latin-1 "
        "`iconv -f latin1 -t utf-8 IN > OUT`"
    )


def not_utf8(file: str, raw: bytes, start: int, *, first_line: int = 1) -> str:
    """``FILE:LINE: not UTF-8 text (byte 0xff at column 3)`` for a decode error at ``start``
    of ``raw`` (which begins at line ``first_line`` of the file)."""
    line = raw[:start].count(b"\n") + first_line
    column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
    return f"{file}:{line}: not UTF-8 text (byte 0x{raw[start]:02x} at column {column})"


def not_json(where: str, exc: json.JSONDecodeError | RecursionError) -> str:
    """``FILE:LINE: not valid JSON (Expecting value at column 10)`` for one JSONL line."""
    if isinstance(exc, RecursionError):
        return f"{where}: not valid JSON (nested too deeply)"
    return f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
