"""Task data -> token id chunks -> padded batches.

DATA is a JSONL file, a plain text file (one document per file) or a folder of those (walked
recursively, in sorted path order). A JSONL record gives its text by, in this order:

* ``--text-field NAME``: that field, which must be there;
* a ``text`` field;
* ``messages`` (a chat), rendered with the tokenizer's chat template;
* ``prompt`` + ``completion``: two strings concatenated, or two lists of messages joined and
  rendered as one chat.

Each record or text file is one document. ``--shard I/N`` keeps documents I, I+N, I+2N, ...
(counted over the whole of DATA). Documents are tokenized, cut into chunks of at most
``seq_len`` tokens, and cut off once ``max_tokens`` tokens are taken; a text longer than
``PIECE_CHARS`` characters is tokenized piece by piece and only as far as ``max_tokens`` needs,
so one huge line costs about what the same text split into lines does. Blank documents hold no
tokens; a profile needs at least ``MIN_TOKENS`` tokens. Batches are padded on the
right; the attention mask marks the real tokens, and padding is never counted.

Everything is read and tokenized before the model is loaded, so bad data fails fast.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mfprune.errors import DataError, MfpruneError, did_you_mean
from mfprune.io.text import encoding_hint, not_json, not_utf8

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
MIN_TOKENS = 16  # fewer tokens make every expert tie: a plan on noise
PIECE_CHARS = 1 << 16  # longer texts are tokenized in pieces (bounded memory, early stop)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")


@dataclass(frozen=True)
class Shard:
    """Keep documents ``index``, ``index + count``, ... (``--shard index/count``)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'1/4' -> Shard(1, 4)."""
        head, sep, tail = text.strip().partition("/")
        if sep and head.isdigit() and tail.isdigit() and int(head) < int(tail):
            return cls(int(head), int(tail))
        raise MfpruneError(
            f"cannot read shard '{text}'",
            hint="write I/N with 0 <= I < N: --shard 0/4 profiles documents 0, 4, 8, ...",
        )

    def keeps(self, document: int) -> bool:
        return document % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard()  # every document


@dataclass(frozen=True)
class Record:
    """One document: plain text, or a chat to render with the tokenizer's template."""

    where: str  # "file.jsonl:12" or "notes/a.txt", for error messages
    text: str | None = None
    messages: list[Any] | None = None


@dataclass(frozen=True)
class TokenData:
    """Token id chunks ready to batch, and where they came from."""

    chunks: list[torch.Tensor]  # each [S_i] int32, 1 <= S_i <= seq_len
    documents: int  # documents read (this shard's), including ones with no tokens
    fingerprint: str  # sha256 over the chunks' token ids (and their boundaries)

    @property
    def tokens(self) -> int:
        return sum(c.numel() for c in self.chunks)

    def batches(
        self, *, batch_size: int, pad_id: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(input_ids [B, S], attention_mask [B, S])``, padded on the right.

        Chunks are batched longest first, so chunks of similar length share a batch and little
        compute goes to padding; the stats are sums, so the order does not change them.
        """
        order = sorted(range(len(self.chunks)), key=lambda i: -self.chunks[i].numel())
        for start in range(0, len(order), batch_size):
            group = [self.chunks[i] for i in order[start : start + batch_size]]
            width = max(c.numel() for c in group)
            ids = torch.full((len(group), width), pad_id, dtype=torch.long)  # [B, S]
            mask = torch.zeros((len(group), width), dtype=torch.long)  # [B, S]
            for row, chunk in enumerate(group):
                ids[row, : chunk.numel()] = chunk
                mask[row, : chunk.numel()] = 1
            yield ids, mask


def load_token_data(
    path: str | Path,
    tokenizer: Any,
    *,
    seq_len: int,
    max_tokens: int | None = None,
    text_field: str | None = None,
    shard: Shard = WHOLE,
    min_tokens: int = 1,
) -> TokenData:
    """Read, tokenize and chunk DATA (see the module docstring); raise DataError on bad data,
    or when it holds fewer than ``min_tokens`` tokens (profiles ask for ``MIN_TOKENS``)."""
    root = Path(path)
    if max_tokens is not None and max_tokens < min_tokens:
        raise DataError(
            f"--max-tokens {max_tokens} is below the {min_tokens} tokens a profile needs",
            hint=f"pass --max-tokens {min_tokens} or more (or leave it out: all of the data)",
        )
    digest = hashlib.sha256()
    chunks: list[torch.Tensor] = []
    documents = taken = 0
    seen = 0

    def add(piece: list[int]) -> None:
        nonlocal taken
        chunk = torch.tensor(piece, dtype=torch.int32)
        digest.update(len(piece).to_bytes(8, "little"))
        digest.update(chunk.to(torch.int64).numpy().tobytes())
        chunks.append(chunk)
        taken += len(piece)

    for number, record in enumerate(iter_records(root, text_field=text_field)):
        seen = number + 1
        if not shard.keeps(number):
            continue
        if max_tokens is not None and taken >= max_tokens:
            break
        documents += 1
        buffer: list[int] = []  # this document's tokens not yet cut into a chunk
        for ids in encode_pieces(record, tokenizer):  # long texts: piece by piece
            buffer += ids
            while len(buffer) >= seq_len and (max_tokens is None or taken < max_tokens):
                add(buffer[: min(seq_len, max_tokens - taken) if max_tokens else seq_len])
                buffer = buffer[seq_len:]
            if max_tokens is not None and taken + len(buffer) >= max_tokens:
                break  # enough: the rest of the document is never tokenized
        if buffer and (max_tokens is None or taken < max_tokens):
            add(buffer[: max_tokens - taken] if max_tokens else buffer)
    if not chunks:
        if seen == 0:
            raise DataError(
                f"no documents in {root}: it is empty",
                hint="point --data at a JSONL file, a text file or a folder of those",
            )
        if documents == 0:
            raise DataError(
                f"shard {shard} has no documents: {root} holds only {seen}",
                hint="use fewer shards than documents",
            )
        raise DataError(
            f"the documents in {root} hold no tokens (all {documents} are empty)",
            hint="check the text field (--text-field) and the data",
        )
    if taken < min_tokens:
        raise DataError(
            f"{root} holds only {taken} {'token' if taken == 1 else 'tokens'} of text; a "
            f"profile needs at least {min_tokens}",
            hint="profile on real task data: a few hundred documents or more",
        )
    return TokenData(chunks=chunks, documents=documents, fingerprint=digest.hexdigest())


# ------------------------------------------------------------------------------------ reading


def iter_records(path: Path, *, text_field: str | None = None) -> Iterator[Record]:
    """Every document of DATA, in order; raise DataError on unreadable input."""
    for file in data_files(path):
        if file.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_records(file, text_field=text_field)
        else:
            yield Record(where=str(file), text=_read_text(file))


def data_files(path: Path) -> list[Path]:
    """DATA as a list of files: itself, or the JSONL / text files of a folder."""
    if not path.exists():
        raise DataError(f"data {path} does not exist", hint="check the --data path")
    if path.is_file():
        return [path]
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        raise DataError(
            f"{path} is a `datasets` folder (save_to_disk), which mfprune cannot read yet",
            hint="export it to JSONL: datasets.load_from_disk(path).to_json('data.jsonl')",
        )
    files, other = [], set()
    for p in sorted(path.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        if p.suffix.lower() in JSONL_SUFFIXES + TEXT_SUFFIXES:
            files.append(p)
        else:
            other.add(p.suffix or p.name)
    if not files:
        found = f" (found: {', '.join(sorted(other))})" if other else ""
        raise DataError(
            f"no data files in folder {path}{found}",
            hint=f"a data folder holds {', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)} files",
        )
    return files


def _read_text(file: Path) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(not_utf8(str(file), raw, exc.start), hint=encoding_hint(raw)) from None


def _jsonl_records(file: Path, *, text_field: str | None) -> Iterator[Record]:
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{file}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                message = not_utf8(str(file), raw, exc.start, first_line=number)
                raise DataError(message, hint=encoding_hint(raw)) from None
            del raw  # a line can be a whole corpus: keep one copy of it, not two
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    not_json(where, exc), hint="JSONL holds one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{where}: expected a JSON object, got {_json_type(obj)}",
                    hint='JSONL holds one JSON object per line, e.g. {"text": "..."}',
                )
            yield _record(obj, where, text_field=text_field)


def _record(obj: dict[str, Any], where: str, *, text_field: str | None) -> Record:
    if text_field is not None:
        if text_field not in obj:
            raise DataError(
                f"{where}: no '{text_field}' field{did_you_mean(text_field, obj)} "
                f"(fields: {_fields(obj)})",
                hint="pass --text-field NAME with the field that holds the text",
            )
        return Record(where=where, text=_string(obj, text_field, where))
    if "text" in obj:
        return Record(where=where, text=_string(obj, "text", where))
    if "messages" in obj:
        return Record(where=where, messages=_chat(obj["messages"], f"{where}: 'messages'"))
    if "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            return Record(where=where, messages=_chat(prompt + completion, f"{where}: 'prompt'"))
        return Record(
            where=where, text=_string(obj, "prompt", where) + _string(obj, "completion", where)
        )
    strings = [k for k, v in obj.items() if isinstance(v, str)]
    hint = (
        f"pass --text-field {strings[0]}"
        if len(strings) == 1
        else "pass --text-field NAME with the field that holds the text"
    )
    raise DataError(
        f"{where}: no 'text' field, and no 'messages' or 'prompt'/'completion' "
        f"(fields: {_fields(obj)})",
        hint=hint,
    )


def _fields(obj: dict[str, Any]) -> str:
    return ", ".join(f"'{k}'" for k in obj) or "none"


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field '{key}' is {_json_type(value)}, not a string",
            hint="pass --text-field NAME with the field that holds the text",
        )
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"


def _chat(messages: Any, where: str) -> list[Any]:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise DataError(
            f"{where} is not a list of {{'role': ..., 'content': ...}} messages",
            hint="or pass --text-field NAME with a field that holds plain text",
        )
    return messages


# --------------------------------------------------------------------------------- tokenizing


def encode_pieces(record: Record, tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of one document, piece by piece: a text up to ``PIECE_CHARS`` long in one
    piece (exactly ``encode``), a longer one cut at whitespace into pieces of about that many
    characters, each tokenized only when the caller asks for it (special tokens on the first).
    A blank text has no tokens."""
    text = record.text
    if record.messages is not None or text is None or len(text) <= PIECE_CHARS:
        if text is None or text.strip():
            yield encode(record, tokenizer)
        return
    start, first = 0, True
    while start < len(text):
        end = min(start + PIECE_CHARS, len(text))
        if end < len(text):  # cut before the last whitespace of the piece, if it has one
            cut = max(text.rfind(c, start + PIECE_CHARS // 2, end) for c in " \n\t")
            end = cut if cut > start else end
        ids = tokenizer(text[start:end], add_special_tokens=first, verbose=False)["input_ids"]
        yield list(ids)
        start, first = end, False


def encode(record: Record, tokenizer: Any) -> list[int]:
    """Token ids of one document (the tokenizer's special tokens included)."""
    if record.messages is None:
        return list(tokenizer(record.text, add_special_tokens=True, verbose=False)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{record.where}: a chat ('messages') needs a chat template, and the model's "
            "tokenizer has none",
            hint="pass --text-field NAME with a plain-text field, or add a chat_template to "
            "the tokenizer",
        )
    from jinja2 import TemplateError

    try:
        rendered = tokenizer.apply_chat_template(record.messages, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise DataError(
            f"{record.where}: the chat template failed on this chat: {exc}",
            hint="check the messages' roles and contents",
        ) from None
    return list(tokenizer(rendered, add_special_tokens=False, verbose=False)["input_ids"])
