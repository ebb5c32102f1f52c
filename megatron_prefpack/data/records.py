"""Preference records: JSONL lines -> validated :class:`Record` objects (no tokenization).

Accepted record shapes (one JSON object per line; ``.gz`` files are read transparently;
keys not listed are ignored):

1. ``{"prompt": str, "chosen": str, "rejected": str, "margin"?: number}``: a pair.
2. Chat messages: ``prompt`` is a list of ``{"role", "content", ...}`` messages and each
   response is an assistant message or a string (wrapped as an assistant message). These
   are rendered with a chat template at tokenization time (see ``chat_templates``).
3. Implicit-prompt pairs (HH-RLHF): ``{"chosen": str, "rejected": str}`` holding whole
   conversations. The prompt is their common prefix cut back to the end of the last
   ``"\\n\\nAssistant:"`` marker inside it; the responses are the rest of each text. The
   same shape with lists of messages takes the common leading messages as the prompt and
   requires each remainder to be exactly one assistant message.
4. K responses: ``{"prompt", "responses": [...], "scores": [...]}`` (kind ``"ranked"``,
   one finite score per response) or ``{"prompt", "responses": [...]}`` (kind ``"multi"``,
   K SFT targets, e.g. a thinking and a non-thinking answer).

Nothing is stripped or repaired: a malformed line, a missing or empty field, a wrong type
or JSON nested deeper than :data:`MAX_JSON_DEPTH` raises :class:`InvalidRecord` naming the
file, line and field. Blank lines (only whitespace) are not records; :func:`iter_lines`
reports them so callers can count them. A file that cannot be read to its end (a truncated
or corrupt ``.gz``, an I/O error) raises :class:`UnreadableInput` naming the last good line.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ASSISTANT_MARKER = "\n\nAssistant:"
"""Turn boundary used to split implicit-prompt text pairs (HH-RLHF convention)."""

MAX_JSON_DEPTH = 100
"""Deepest nesting of objects and lists a record may have (the top-level object is level 1).
Real records need a handful; the limit keeps the parser and the validation, both recursive,
far from Python's recursion limit."""

Message = dict[str, Any]
"""A chat message: at least ``role`` and ``content`` (both strings); other keys are kept
for the chat template (e.g. ``reasoning_content``)."""


class InvalidRecord(Exception):
    """A record that cannot be used as it is.

    ``path`` and ``line`` (1-based) locate it, ``field`` names the offending value as a
    JSON path (``"chosen"``, ``"prompt[2].content"``, ``"responses[1]"``), ``""`` when the
    whole line is at fault (not UTF-8, not JSON, group too long) or ``"<record>"`` when it
    nests deeper than :data:`MAX_JSON_DEPTH`, ``reason`` says what is
    wrong and ``category`` is a short stable key used to count drops in summaries.
    """

    def __init__(self, path: str, line: int, field: str, reason: str, category: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.reason = reason
        self.category = category
        super().__init__(self.location + ": " + (f"field '{field}': " if field else "") + reason)

    @property
    def location(self) -> str:
        return f"{self.path}:{self.line}"

    def __reduce__(self) -> tuple:
        return (InvalidRecord, (self.path, self.line, self.field, self.reason, self.category))


class UnreadableInput(ValueError):
    """An input file that cannot be read to its end: ``path``, the last line read completely
    (``last_line``, 0 if none) and ``reason``. Not a record error: ``--skip-invalid`` does not
    skip it, since nothing after the fault can be read. A ``ValueError``, so callers that
    report bad input by catching ``ValueError`` report this too."""

    def __init__(self, path: str, last_line: int, reason: str) -> None:
        self.path = path
        self.last_line = last_line
        self.reason = reason
        super().__init__(f"{path}:{last_line + 1}: cannot read past line {last_line}: {reason}")

    def __reduce__(self) -> tuple:
        return (UnreadableInput, (self.path, self.last_line, self.reason))


@dataclass(frozen=True)
class Record:
    """One validated record.

    ``prompt`` is text (``str``) or a tuple of chat messages; ``responses`` are texts when
    the prompt is text and assistant messages when it is a chat. ``kind`` is ``"pair"``
    (responses = chosen, rejected), ``"ranked"`` or ``"multi"``; ``scores`` has one entry
    per response (``[1.0, 0.0]`` for pairs, ``None`` for ``"multi"``).
    """

    path: str
    line: int
    kind: str
    prompt: str | tuple[Message, ...]
    responses: tuple[str | Message, ...]
    scores: tuple[float, ...] | None = None
    margin: float | None = None

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)

    def texts(self) -> list[str]:
        """Every piece of text the record carries (prompt and responses, message contents)."""
        parts = [self.prompt] if isinstance(self.prompt, str) else [m["content"] for m in self.prompt]
        parts += [r if isinstance(r, str) else r["content"] for r in self.responses]
        return parts


def open_binary(path: str | Path):
    """Open a JSONL file for binary reading, decompressing ``.gz`` files."""
    path = Path(path)
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_line)`` for every line of the file, 1-based, bytes as stored.

    Raises :class:`UnreadableInput` when reading stops before the end of the file (only
    complete lines are yielded before it); opening a missing file raises ``FileNotFoundError``.
    """
    line = 0
    with open_binary(path) as f:
        try:
            for line, raw in enumerate(f, start=1):
                yield line, raw
        except (EOFError, zlib.error, OSError) as e:
            raise UnreadableInput(str(path), line, _read_failure(e)) from None


def is_blank(raw: bytes) -> bool:
    return not raw.strip()


def parse_record(raw: bytes, path: str, line: int) -> Record:
    """Decode, parse and validate one JSONL line. Raises :class:`InvalidRecord`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRecord(path, line, "", f"not valid UTF-8 (byte {e.start})", "not_utf8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRecord(
            path, line, "", f"malformed JSON: {e.msg} at column {e.colno}", "bad_json"
        ) from None
    except RecursionError:  # deeper than the parser can go, so deeper than MAX_JSON_DEPTH
        raise _too_deep(path, line) from None
    if _nested_deeper_than(obj, text, MAX_JSON_DEPTH):
        raise _too_deep(path, line)
    return _RecordParser(path, line).parse(obj)


def _too_deep(path: str, line: int) -> InvalidRecord:
    return InvalidRecord(path, line, "<record>", f"nested deeper than {MAX_JSON_DEPTH} levels", "too_deep")


def iter_records(
    path: str | Path, on_invalid: Callable[[InvalidRecord], None] | None = None
) -> Iterator[tuple[int, Record]]:
    """Yield ``(line_number, record)`` for every non-blank line.

    An invalid line raises :class:`InvalidRecord`, unless ``on_invalid`` is given: then it
    is passed the exception and the line is skipped.
    """
    name = str(path)
    for line, raw in iter_lines(path):
        if is_blank(raw):
            continue
        try:
            yield line, parse_record(raw, name, line)
        except InvalidRecord as e:
            if on_invalid is None:
                raise
            on_invalid(e)


class _RecordParser:
    """Validation for one line; every error carries the line's location."""

    def __init__(self, path: str, line: int) -> None:
        self.path = path
        self.line = line

    def error(self, field: str, reason: str, category: str) -> InvalidRecord:
        return InvalidRecord(self.path, self.line, field, reason, category)

    def parse(self, obj: Any) -> Record:
        if not isinstance(obj, dict):
            raise self.error("", f"expected a JSON object, got {_type_name(obj)}", "wrong_type")
        if "responses" in obj:
            return self._parse_k(obj)
        if "chosen" in obj or "rejected" in obj:
            for key in ("chosen", "rejected"):
                if key not in obj:
                    raise self.error(
                        key, "missing (a pair needs both 'chosen' and 'rejected')", "missing_field"
                    )
            return self._parse_pair(obj) if "prompt" in obj else self._parse_implicit_pair(obj)
        raise self.error(
            "",
            "no response field: expected 'chosen'+'rejected' (with or without 'prompt') or 'prompt'+'responses'",
            "missing_field",
        )

    def _parse_pair(self, obj: dict) -> Record:
        prompt = self._prompt(obj)
        chosen = self._response(obj["chosen"], "chosen", chat=not isinstance(prompt, str))
        rejected = self._response(obj["rejected"], "rejected", chat=not isinstance(prompt, str))
        return Record(self.path, self.line, "pair", prompt, (chosen, rejected), (1.0, 0.0), self._margin(obj))

    def _parse_implicit_pair(self, obj: dict) -> Record:
        chosen, rejected = obj["chosen"], obj["rejected"]
        if isinstance(chosen, str) and isinstance(rejected, str):
            prompt, responses = self._split_text_pair(chosen, rejected)
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, responses = self._split_chat_pair(chosen, rejected)
        else:
            raise self.error(
                "rejected",
                f"'chosen' is {_type_name(chosen)} but 'rejected' is {_type_name(rejected)}; "
                "both must be strings or both lists of messages",
                "wrong_type",
            )
        return Record(self.path, self.line, "pair", prompt, responses, (1.0, 0.0), self._margin(obj))

    def _split_text_pair(self, chosen: str, rejected: str) -> tuple[str, tuple[str, str]]:
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not value:
                raise self.error(key, "empty string", "empty_field")
        common = _common_prefix_length(chosen, rejected)
        cut = chosen.rfind(ASSISTANT_MARKER, 0, common)
        if cut < 0:
            raise self.error(
                "chosen",
                f"no prompt: the common prefix of 'chosen' and 'rejected' contains no {ASSISTANT_MARKER!r} "
                "turn boundary (give an explicit 'prompt')",
                "no_prompt",
            )
        end = cut + len(ASSISTANT_MARKER)
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if end == len(value):
                raise self.error(
                    key,
                    f"empty response after the shared prompt (ends with {ASSISTANT_MARKER!r})",
                    "empty_field",
                )
        return chosen[:end], (chosen[end:], rejected[end:])

    def _split_chat_pair(
        self, chosen: list, rejected: list
    ) -> tuple[tuple[Message, ...], tuple[Message, Message]]:
        chosen_msgs = self._messages(chosen, "chosen")
        rejected_msgs = self._messages(rejected, "rejected")
        shared = 0
        while (
            shared < min(len(chosen_msgs), len(rejected_msgs))
            and chosen_msgs[shared] == rejected_msgs[shared]
        ):
            shared += 1
        if shared == 0:
            raise self.error(
                "chosen", "no prompt: 'chosen' and 'rejected' share no leading message", "no_prompt"
            )
        responses = []
        for key, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
            rest = msgs[shared:]
            if len(rest) != 1 or rest[0]["role"] != "assistant":
                raise self.error(
                    key,
                    f"after the {shared} shared message(s) expected exactly one assistant message, "
                    f"got {[m['role'] for m in rest]}",
                    "bad_value",
                )
            responses.append(rest[0])
        return chosen_msgs[:shared], (responses[0], responses[1])

    def _parse_k(self, obj: dict) -> Record:
        prompt = self._prompt(obj)
        values = obj["responses"]
        if not isinstance(values, list):
            raise self.error("responses", f"expected a list, got {_type_name(values)}", "wrong_type")
        if not values:
            raise self.error("responses", "empty list", "empty_field")
        chat = not isinstance(prompt, str)
        responses = tuple(self._response(v, f"responses[{i}]", chat) for i, v in enumerate(values))
        if "scores" not in obj:
            return Record(self.path, self.line, "multi", prompt, responses, None, None)
        scores = obj["scores"]
        if not isinstance(scores, list):
            raise self.error("scores", f"expected a list of numbers, got {_type_name(scores)}", "wrong_type")
        if len(scores) != len(responses):
            raise self.error("scores", f"{len(scores)} scores for {len(responses)} responses", "bad_value")
        checked = tuple(self._number(s, f"scores[{i}]") for i, s in enumerate(scores))
        return Record(self.path, self.line, "ranked", prompt, responses, checked, None)

    def _prompt(self, obj: dict) -> str | tuple[Message, ...]:
        if "prompt" not in obj:
            raise self.error("prompt", "missing", "missing_field")
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise self.error("prompt", "empty string", "empty_field")
            return prompt
        if isinstance(prompt, list):
            return self._messages(prompt, "prompt")
        raise self.error(
            "prompt", f"expected a string or a list of messages, got {_type_name(prompt)}", "wrong_type"
        )

    def _response(self, value: Any, field: str, chat: bool) -> str | Message:
        if isinstance(value, str):
            if not value:
                raise self.error(field, "empty string", "empty_field")
            return {"role": "assistant", "content": value} if chat else value
        if isinstance(value, dict):
            if not chat:
                raise self.error(
                    field, "a message response needs a prompt given as a list of messages", "wrong_type"
                )
            message = self._message(value, field)
            if message["role"] != "assistant":
                raise self.error(
                    f"{field}.role", f"expected 'assistant', got {message['role']!r}", "bad_value"
                )
            return message
        raise self.error(
            field, f"expected a string or a message object, got {_type_name(value)}", "wrong_type"
        )

    def _messages(self, value: list, field: str) -> tuple[Message, ...]:
        if not value:
            raise self.error(field, "empty list of messages", "empty_field")
        return tuple(self._message(m, f"{field}[{i}]") for i, m in enumerate(value))

    def _message(self, value: Any, field: str) -> Message:
        if not isinstance(value, dict):
            raise self.error(field, f"expected a message object, got {_type_name(value)}", "wrong_type")
        for key in ("role", "content"):
            if key not in value:
                raise self.error(f"{field}.{key}", "missing", "missing_field")
            if not isinstance(value[key], str):
                raise self.error(
                    f"{field}.{key}", f"expected a string, got {_type_name(value[key])}", "wrong_type"
                )
            if not value[key]:
                raise self.error(f"{field}.{key}", "empty string", "empty_field")
        return value

    def _margin(self, obj: dict) -> float | None:
        return self._number(obj["margin"], "margin") if "margin" in obj else None

    def _number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(field, f"expected a number, got {_type_name(value)}", "wrong_type")
        if not math.isfinite(value):
            raise self.error(field, f"not a finite number: {value}", "bad_value")
        return float(value)


def _read_failure(error: BaseException) -> str:
    """What stopped reading a file, in words."""
    if isinstance(error, EOFError):
        return f"the compressed stream ends early (truncated file?): {error}"
    if isinstance(error, zlib.error | gzip.BadGzipFile):
        return f"corrupt compressed data: {error}"
    return str(error)


def _nested_deeper_than(obj: Any, text: str, limit: int) -> bool:
    """Whether ``obj`` (parsed from ``text``) nests objects/lists more than ``limit`` levels.
    Iterative; only walks ``obj`` when ``text`` has enough brackets to possibly be that deep."""
    if text.count("{") + text.count("[") <= limit:
        return False
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in value)
    return False


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
