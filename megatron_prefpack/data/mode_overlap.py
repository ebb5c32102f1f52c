"""``prefpack mode-overlap``: Think-Fusion's mode-overlap set from a thinking and a plain SFT set.

Think-Fusion (A.X K1, arXiv 2601.09200) fine-tunes a merged thinking/non-thinking model on the
same prompts answered once with reasoning and once without. Such a sample is one prompt with
two responses, a ``multi`` record (see :mod:`records`), so preference packing computes the
prompt once for both answers.

Inputs: two JSONL files (optionally ``.gz``) of single-response SFT records,
``{"prompt": ..., "responses": [answer]}`` (a text prompt or chat messages, as in
:mod:`records`). Every thinking answer must open (after leading whitespace) with one
``<think>...</think>`` block followed by a non-blank answer; a plain answer must contain
neither tag. Neither may contain a mode marker already.

Mode markers. The prompt is shared by both answers, so the mode request cannot live in the
prompt: each response opens with a marker, ``/think`` or ``/no_think`` by default, glued to
the answer text as given (``"/think" + "<think>...</think> answer"``; put a separator in the
answers if one is wanted). At inference the marker is prefilled after the prompt (as Qwen3's
template prefills an empty think block) and selects the mode. The markers and the two think
tags must be single tokenizer pieces (``prefpack train-tokenizer --user-defined-symbols``;
``--tokenizer`` checks it). ``/think`` is also a substring of ``</think>``: SentencePiece's
user-defined symbols and Hugging Face added tokens both take the longest match, so each stays
its own token, and the check for markers already in an answer looks outside the tags. With
chat records the marker opens the assistant message's content, right after the template's
generation prompt. The marker is a trained token of the response: in the overlap set
both markers follow the same prompt, so its loss tends to ``log 2`` per response (``2 log 2``
per group), a constant that the prefilled marker makes harmless; in each parent's single-mode
set (``--emit-single``) it tends to 0.

Joining: prompts are equal when their text is equal, or their message lists are equal
(every key of every message); a text prompt never equals a chat prompt. A prompt seen again
in the same file is a duplicate: its later records are dropped and counted (the first record
of a prompt is the one used). Prompts found in only one file are dropped and counted. The
output has one record per matched prompt, in the thinking file's order, responses
``[think_marker + thinking answer, plain_marker + plain answer]`` (response 0 = thinking,
the index ``objective.sft.response_weights`` weighs). ``--emit-single DIR`` also writes every
record of each input with its own marker (``DIR/thinking.jsonl``, ``DIR/plain.jsonl``), the
parents' SFT sets.

Errors (bad JSON, a missing field, a wrong record shape, a response in the wrong mode) name
file, line and field, and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_prefpack.data.records import InvalidRecord, Message, Record, UnreadableInput, iter_records
from megatron_prefpack.data.tokenizers import TokenizerError, load_tokenizer

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DEFAULT_THINK_MARKER = "/think"
DEFAULT_PLAIN_MARKER = "/no_think"
MODES = ("thinking", "plain")
"""Response index 0 and 1 of every output record."""


class ModeOverlapError(ValueError):
    """Bad options (markers, tokenizer) or nothing to write; the message names the option."""


@dataclass(frozen=True)
class Markers:
    """The marker opening each mode's responses (``thinking``: index 0, ``plain``: index 1)."""

    thinking: str = DEFAULT_THINK_MARKER
    plain: str = DEFAULT_PLAIN_MARKER

    def __post_init__(self) -> None:
        for option, marker in (("--think-marker", self.thinking), ("--plain-marker", self.plain)):
            if not marker or marker != marker.strip():
                raise ModeOverlapError(
                    f"{option}: must be non-empty without surrounding whitespace, got {marker!r}"
                )
            if THINK_OPEN in marker or THINK_CLOSE in marker:
                raise ModeOverlapError(f"{option}: {marker!r} must not contain {THINK_OPEN} or {THINK_CLOSE}")
        if self.thinking in self.plain or self.plain in self.thinking:
            raise ModeOverlapError(
                f"--think-marker {self.thinking!r} and --plain-marker {self.plain!r}: neither may contain the "
                "other (a marker must tell the modes apart)"
            )

    def of(self, mode: str) -> str:
        return self.thinking if mode == "thinking" else self.plain

    def pieces(self) -> tuple[str, str, str, str]:
        """The four strings that must be single tokenizer pieces."""
        return (self.thinking, self.plain, THINK_OPEN, THINK_CLOSE)


@dataclass
class SetCounts:
    """What one input file held: records read, later records of an already seen prompt dropped,
    prompts found only in this file (dropped)."""

    path: str
    records: int = 0
    duplicates: int = 0
    only_here: int = 0


@dataclass
class JoinCounts:
    """The join's bookkeeping: ``matched`` = records written to the overlap set."""

    thinking: SetCounts
    plain: SetCounts
    matched: int = 0
    output: str = ""
    single: dict[str, str] = field(default_factory=dict)
    """mode -> path of the ``--emit-single`` file."""

    def format(self) -> str:
        lines = [
            f"matched prompts        {self.matched:>7}  -> {self.output} (responses [thinking, plain])",
        ]
        for mode in MODES:
            counts: SetCounts = getattr(self, mode)
            lines.append(
                f"{mode + ' set':<22} {counts.records:>7}  records in {counts.path}: "
                f"{counts.only_here} prompts only here (dropped), "
                f"{counts.duplicates} duplicate-prompt records (dropped; the first record of a prompt is used)"
            )
        lines += [f"{'single-mode ' + mode:<22} {'':>7}  -> {path}" for mode, path in self.single.items()]
        return "\n".join(lines)


def prompt_key(record: Record) -> tuple[str, str]:
    """Equal for equal prompts: the text, or the messages as canonical JSON (every key)."""
    if isinstance(record.prompt, str):
        return ("text", record.prompt)
    return ("chat", json.dumps(list(record.prompt), sort_keys=True, ensure_ascii=False))


def _content(response: str | Message) -> str:
    return response if isinstance(response, str) else response["content"]


def _content_field(record: Record, index: int) -> str:
    return f"responses[{index}]" + (".content" if record.is_chat else "")


def mode_error(text: str, mode: str, markers: Markers) -> str | None:
    """Why ``text`` is not a valid ``mode`` answer before its marker is added (None: it is)."""
    untagged = text.replace(THINK_OPEN, "\0").replace(THINK_CLOSE, "\0")  # "/think" is inside "</think>"
    for marker in markers.pieces()[:2]:
        if marker in untagged:
            return f"already contains the mode marker {marker!r} (the builder prepends the markers)"
    opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if mode == "plain":
        if opens or closes:
            return f"a plain answer must contain no {THINK_OPEN}...{THINK_CLOSE} block"
        return None
    if opens != 1 or closes != 1:
        return (
            f"a thinking answer needs exactly one {THINK_OPEN}...{THINK_CLOSE} block, "
            f"found {opens} {THINK_OPEN} and {closes} {THINK_CLOSE}"
        )
    if not text.lstrip().startswith(THINK_OPEN):
        return f"a thinking answer must open with {THINK_OPEN} (leading whitespace allowed)"
    if not text.split(THINK_CLOSE, 1)[1].strip():
        return f"a thinking answer needs a non-blank answer after {THINK_CLOSE}"
    return None


def read_mode_set(path: str | Path, mode: str, markers: Markers) -> Iterator[Record]:
    """The records of one single-mode file, each checked: a one-response record whose answer is
    a valid ``mode`` answer. Raises :class:`InvalidRecord` (file, line, field) or
    :class:`UnreadableInput`."""
    for line, record in iter_records(path):
        if record.kind != "multi" or len(record.responses) != 1:
            shape = (
                f"{len(record.responses)} responses" if record.kind == "multi" else f"a {record.kind} record"
            )
            reason = f"expected one response ({{'prompt', 'responses': [answer]}}), got {shape}"
            raise InvalidRecord(str(path), line, "responses", reason, "bad_value")
        reason = mode_error(_content(record.responses[0]), mode, markers)
        if reason is not None:
            raise InvalidRecord(str(path), line, _content_field(record, 0), reason, "wrong_mode")
        yield record


def with_marker(response: str | Message, marker: str) -> str | Message:
    """``response`` with ``marker`` glued in front of its text (a message keeps its other keys)."""
    if isinstance(response, str):
        return marker + response
    return {**response, "content": marker + response["content"]}


def _record_json(prompt: str | tuple[Message, ...], responses: Iterable[str | Message]) -> str:
    value: dict[str, Any] = {
        "prompt": prompt if isinstance(prompt, str) else list(prompt),
        "responses": list(responses),
    }
    return json.dumps(value, ensure_ascii=False)


class _AtomicText:
    """A text file written to ``PATH.tmp`` and renamed to ``PATH`` on success (removed on error)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "w", encoding="utf-8")
        return self.file

    def __exit__(self, kind, value, traceback) -> None:
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _first_by_prompt(records: Iterable[Record], counts: SetCounts) -> dict[tuple[str, str], Record]:
    """The first record of each prompt, in file order; counts records and dropped duplicates."""
    first: dict[tuple[str, str], Record] = {}
    for record in records:
        counts.records += 1
        key = prompt_key(record)
        if key in first:
            counts.duplicates += 1
        else:
            first[key] = record
    return first


def _refuse_overwriting_inputs(inputs: dict[str, str | Path], outputs: dict[str, str | Path]) -> None:
    """Raise :class:`ModeOverlapError` when an output file would replace an input file."""
    for out_option, out_path in outputs.items():
        for in_option, in_path in inputs.items():
            if Path(out_path).resolve() == Path(in_path).resolve():
                raise ModeOverlapError(f"{out_option} would overwrite the {in_option} input {in_path}")


def build_mode_overlap(
    thinking: str | Path,
    plain: str | Path,
    output: str | Path,
    markers: Markers = Markers(),
    emit_single: str | Path | None = None,
) -> JoinCounts:
    """Join ``thinking`` and ``plain`` by prompt and write the overlap set to ``output`` (and,
    with ``emit_single``, each input's records with their marker to ``emit_single/<mode>.jsonl``).

    Every record of both files is checked before anything is written. Raises
    :class:`InvalidRecord`, :class:`UnreadableInput`, ``OSError``, or :class:`ModeOverlapError`
    when an output path is an input or no prompt is in both files (nothing is written then).
    """
    single = {mode: Path(emit_single) / f"{mode}.jsonl" for mode in MODES} if emit_single is not None else {}
    _refuse_overwriting_inputs(
        {"--thinking": thinking, "--plain": plain},
        {"--output": output, **{f"--emit-single {path}": path for path in single.values()}},
    )
    counts = JoinCounts(SetCounts(str(thinking)), SetCounts(str(plain)), output=str(output))
    sets = {
        mode: list(read_mode_set(path, mode, markers))
        for mode, path in (("thinking", thinking), ("plain", plain))
    }
    firsts = {mode: _first_by_prompt(sets[mode], getattr(counts, mode)) for mode in MODES}
    matched = [key for key in firsts["thinking"] if key in firsts["plain"]]
    counts.matched = len(matched)
    for mode, other in (("thinking", "plain"), ("plain", "thinking")):
        getattr(counts, mode).only_here = sum(key not in firsts[other] for key in firsts[mode])
    if not matched:
        raise ModeOverlapError(
            f"no prompt is in both --thinking {thinking} ({len(firsts['thinking'])} prompts) and --plain "
            f"{plain} ({len(firsts['plain'])} prompts): nothing to write"
        )
    with _AtomicText(Path(output)) as f:
        for key in matched:
            responses = [with_marker(firsts[mode][key].responses[0], markers.of(mode)) for mode in MODES]
            f.write(_record_json(firsts["thinking"][key].prompt, responses) + "\n")
    for mode, path in single.items():
        with _AtomicText(path) as f:
            for record in sets[mode]:
                f.write(
                    _record_json(record.prompt, [with_marker(record.responses[0], markers.of(mode))]) + "\n"
                )
        counts.single[mode] = str(path)
    return counts


def check_single_pieces(tokenizer_path: str | Path, markers: Markers) -> None:
    """Raise :class:`ModeOverlapError` unless the markers and think tags are each one token of
    the tokenizer, alone and inside text."""
    tokenizer = load_tokenizer(tokenizer_path)
    for piece in markers.pieces():
        ids = tokenizer.encode(piece)
        if len(ids) != 1 or ids[0] not in tokenizer.encode(f"a{piece}a"):
            raise ModeOverlapError(
                f"--tokenizer {tokenizer_path}: {piece!r} is not a single piece (encodes to {ids}); train the "
                "tokenizer with it as a user-defined symbol (prefpack train-tokenizer --user-defined-symbols) "
                "or add it as a token"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Join a thinking and a plain SFT set by prompt into Think-Fusion mode-overlap records "
        "{'prompt', 'responses': [think_marker + thinking answer, plain_marker + plain answer]}."
    )
    parser.add_argument(
        "--thinking",
        required=True,
        help="JSONL of {'prompt', 'responses': [answer]}, answers '<think>...</think> ...'",
    )
    parser.add_argument(
        "--plain", required=True, help="JSONL of {'prompt', 'responses': [answer]}, no think block"
    )
    parser.add_argument("--output", required=True, help="the mode-overlap JSONL to write")
    parser.add_argument(
        "--think-marker",
        default=DEFAULT_THINK_MARKER,
        help=f"opens thinking responses ({DEFAULT_THINK_MARKER})",
    )
    parser.add_argument(
        "--plain-marker", default=DEFAULT_PLAIN_MARKER, help=f"opens plain responses ({DEFAULT_PLAIN_MARKER})"
    )
    parser.add_argument(
        "--emit-single",
        metavar="DIR",
        help="also write each input with its marker: DIR/thinking.jsonl, DIR/plain.jsonl (the parents' SFT sets)",
    )
    parser.add_argument(
        "--tokenizer", help="check that the markers and think tags are single pieces of this tokenizer"
    )


def run(args: argparse.Namespace) -> int:
    try:
        markers = Markers(args.think_marker, args.plain_marker)
        if args.tokenizer:
            check_single_pieces(args.tokenizer, markers)
        counts = build_mode_overlap(args.thinking, args.plain, args.output, markers, args.emit_single)
    except (InvalidRecord, UnreadableInput, ModeOverlapError, TokenizerError, OSError) as e:
        print(f"prefpack mode-overlap: error: {e}", file=sys.stderr)
        return 2
    print(counts.format())
    return 0
