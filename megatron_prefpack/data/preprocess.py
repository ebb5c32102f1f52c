"""``prefpack preprocess``: JSONL preference records -> on-disk dataset of tokenized groups.

Pipeline: the main process reads raw lines in chunks; worker processes parse, tokenize,
truncate and check each line (order preserved); the main process writes the groups with
:class:`~megatron_prefpack.data.group_dataset.GroupDatasetWriter` and keeps the summary.

Tokenization (:func:`tokenize_record`) gives each response the token ids the model sees at
inference and that TRL's ``DPOTrainer`` trains on: prompt + response encoded as one text.

* Text records: ``[BOS] + encode(prompt + response_k)`` for every k, BOS only when the
  tokenizer puts one before a text (``Tokenizer.bos_id``, transformers' rule).
* Chat records: the template renders the prompt with the generation prompt, and the prompt
  + the assistant message as one text (TRL's ``apply_chat_template`` calls); each rendering is
  encoded without special tokens added, a BOS only where the template renders ``bos_token``
  (the built-in templates: see ``chat_templates``).
* Shared prefix: the longest common token prefix of the prompt's own encoding and of every
  prompt + response encoding. It is a prefix of every full encoding, and it never reaches
  past the prompt's own tokens, so no response token is ever shared: a token that merges the
  prompt's end with a response's start (``':' 'ĠB'`` for ``"...Assistant: " + "Blue"``)
  belongs to the response, and a response that is a token-level prefix of another keeps all
  its tokens. Response k is its full encoding minus the shared prefix.
* The packed layout needs >= 1 prompt token: a record whose shared prefix is empty (no BOS,
  and the prompt's first token merges with a response) is invalid
  (``no_prompt_boundary``). Every response has >= 1 token: it ends with EOS (or holds one).
* EOS: text records get the EOS id appended unless the encoding already ends with it (the
  response text ends with the EOS token's text), as TRL appends ``eos_token`` to the text of
  non-conversational completions. Chat records end where the template ends the assistant
  turn, as in TRL (which adds no EOS to conversational data), except that EOS is appended when
  the response's tokens hold no EOS (a template such as ``hh`` that closes turns with none:
  the model could never learn to stop otherwise).

Truncation (``--max-prompt-len`` / ``--max-response-len``) keeps the prompt's end and cuts
responses (see :func:`megatron_prefpack.data.groups.truncate`); it is counted in the
summary. A group whose packed size still exceeds ``--seq-len`` is invalid input. Invalid
input stops the run with an error naming file, line and field (exit code 2), or with
``--skip-invalid`` is skipped, counted by reason and its first few locations listed. An input
that cannot be read to its end (a truncated ``.gz``) or an output that cannot be written (a
full disk) always stops the run (exit code 2) and leaves no dataset behind.

Groups with two responses of identical token ids (a pair whose chosen equals its rejected
after truncation) are kept and counted (``identical_responses``, by kind): the trainer decides
what to do with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from megatron_prefpack.data.chat_templates import ChatTemplate, ChatTemplateError, resolve_chat_template
from megatron_prefpack.data.groups import TokenizedGroup, Truncation, truncate
from megatron_prefpack.data.records import (
    InvalidRecord,
    Record,
    UnreadableInput,
    is_blank,
    iter_lines,
    parse_record,
)
from megatron_prefpack.data.tokenizers import Tokenizer, TokenizerError, load_tokenizer


@dataclass(frozen=True)
class PreprocessOptions:
    """Knobs of :func:`preprocess` (``None`` = no limit). ``workers=1`` runs in-process."""

    seq_len: int | None = None
    max_prompt_len: int | None = None
    max_response_len: int | None = None
    skip_invalid: bool = False
    workers: int = 1
    chat_template: str | None = None
    chunk_size: int = 256
    progress: bool = False
    max_examples: int = 5


@dataclass
class PreprocessSummary:
    """What a run read, wrote, cut and dropped. Token counts are over written groups:
    ``packed_tokens`` is their size in the preference-packed layout, ``unshared_tokens``
    their size with the prompt written once per response (the duplicated baseline).
    ``identical_responses`` counts, by kind, written groups holding two responses with the
    same token ids; ``identical_examples`` locates the first few."""

    input: str
    output: str
    lines_read: int = 0
    blank_lines: int = 0
    groups_written: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    responses: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    packed_tokens: int = 0
    unshared_tokens: int = 0
    prompts_truncated: int = 0
    prompt_tokens_cut: int = 0
    responses_truncated: int = 0
    response_tokens_cut: int = 0
    identical_responses: dict[str, int] = field(default_factory=dict)
    identical_examples: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_examples: list[str] = field(default_factory=list)
    roundtrip_checked: int = 0
    roundtrip_mismatches: int = 0
    roundtrip_example: str | None = None
    seconds: float = 0.0

    @property
    def groups_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def groups_per_s(self) -> float:
        return self.groups_written / self.seconds if self.seconds > 0 else 0.0

    def add(self, group: TokenizedGroup, cut: Truncation, line: int, max_examples: int) -> None:
        """Count a written group (read from source ``line``) and what truncation cut from it."""
        self.groups_written += 1
        self.kinds[group.kind] = self.kinds.get(group.kind, 0) + 1
        self.responses += len(group.responses)
        response_tokens = sum(len(r) for r in group.responses)
        self.prompt_tokens += len(group.prompt)
        self.response_tokens += response_tokens
        self.packed_tokens += group.num_tokens
        self.unshared_tokens += len(group.prompt) * len(group.responses) + response_tokens
        self.prompts_truncated += cut.prompt_tokens > 0
        self.prompt_tokens_cut += cut.prompt_tokens
        self.responses_truncated += cut.responses
        self.response_tokens_cut += cut.response_tokens
        if _has_identical_responses(group):
            self.identical_responses[group.kind] = self.identical_responses.get(group.kind, 0) + 1
            if len(self.identical_examples) < max_examples:
                self.identical_examples.append(f"{self.input}:{line}")

    def drop(self, error: InvalidRecord, max_examples: int) -> None:
        self.dropped[error.category] = self.dropped.get(error.category, 0) + 1
        if len(self.dropped_examples) < max_examples:
            self.dropped_examples.append(str(error))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "groups_dropped": self.groups_dropped, "groups_per_s": self.groups_per_s}

    def format(self) -> str:
        lines = [
            f"preprocessed {self.input} -> {self.output}",
            f"  groups written      {self.groups_written:,} ({', '.join(f'{k} {v:,}' for k, v in sorted(self.kinds.items()))})"
            f" from {self.lines_read:,} lines ({self.blank_lines:,} blank)",
            f"  responses           {self.responses:,}",
            f"  tokens              prompt {self.prompt_tokens:,}, responses {self.response_tokens:,}; "
            f"packed {self.packed_tokens:,} vs {self.unshared_tokens:,} with prompts repeated",
            f"  prompts truncated   {self.prompts_truncated:,} ({self.prompt_tokens_cut:,} tokens cut)",
            f"  responses truncated {self.responses_truncated:,} ({self.response_tokens_cut:,} tokens cut)",
            self._format_identical(),
            f"  groups dropped      {self.groups_dropped:,}"
            + "".join(f"\n    {reason}: {count:,}" for reason, count in sorted(self.dropped.items())),
        ]
        lines += [f"    e.g. {example}" for example in self.dropped_examples]
        if self.roundtrip_mismatches:
            lines.append(
                f"  WARNING: tokenizer does not reproduce the text for {self.roundtrip_mismatches} of "
                f"{self.roundtrip_checked} sampled records (e.g. {self.roundtrip_example}): it normalizes text"
            )
        lines.append(f"  time                {self.seconds:.2f} s, {self.groups_per_s:,.0f} groups/s")
        return "\n".join(lines)

    def _format_identical(self) -> str:
        line = f"  identical responses {sum(self.identical_responses.values()):,} groups"
        if not self.identical_responses:
            return line
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(self.identical_responses.items()))
        return f"{line} ({kinds}; kept), e.g. {', '.join(self.identical_examples)}"


def _has_identical_responses(group: TokenizedGroup) -> bool:
    """Whether two of the group's responses have the same token ids (chosen == rejected for a pair)."""
    return len({r.tobytes() for r in group.responses}) < len(group.responses)


def tokenize_record(
    record: Record, tokenizer: Tokenizer, template: ChatTemplate | None, group_id: int = -1
) -> TokenizedGroup:
    """Tokenize one record into a group: shared prompt prefix and responses ending with EOS, by
    the rules of the module docstring. Chat records need ``template``. Raises
    :class:`InvalidRecord` when the record cannot be rendered or leaves no prompt token."""
    prompt_ids, full_ids = _encode(record, tokenizer, template)
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    sequences = [np.asarray(ids, dtype=np.int32) for ids in full_ids]
    shared = _common_prefix_len(prompt, sequences)
    if shared == 0:
        reason = (
            "encodes to no tokens"
            if not len(prompt)
            else "its first token merges with the start of a response and the tokenizer adds no BOS, "
            "so no prompt token is left"
        )
        raise InvalidRecord(
            record.path, record.line, "prompt", reason, "no_prompt_boundary" if len(prompt) else "empty_field"
        )
    return TokenizedGroup(
        group_id=group_id,
        prompt=sequences[0][:shared],
        responses=[_with_eos(s[shared:], tokenizer.eos_id, record.is_chat) for s in sequences],
        kind=record.kind,
        scores=None if record.scores is None else list(record.scores),
        margin=record.margin,
        meta={"line": record.line},
    )


def _encode(
    record: Record, tokenizer: Tokenizer, template: ChatTemplate | None
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt alone and of the prompt + each response, each one text."""
    if not record.is_chat:
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        return [*bos, *tokenizer.encode(record.prompt)], [
            [*bos, *tokenizer.encode(record.prompt + r)] for r in record.responses
        ]
    prompt_text, response_texts = _rendered(record, tokenizer, template)
    return tokenizer.encode_rendered(prompt_text), [
        tokenizer.encode_rendered(prompt_text + r) for r in response_texts
    ]


def _common_prefix_len(prompt: np.ndarray, sequences: list[np.ndarray]) -> int:
    """Length of the longest common prefix of ``prompt`` and every sequence."""
    shared = len(prompt)
    for s in sequences:
        n = min(shared, len(s))
        differ = np.flatnonzero(prompt[:n] != s[:n])
        shared = int(differ[0]) if len(differ) else n
    return shared


def _with_eos(response: np.ndarray, eos_id: int, chat: bool) -> np.ndarray:
    ends = (response == eos_id).any() if chat else len(response) > 0 and response[-1] == eos_id
    return response if ends else np.append(response, np.int32(eos_id))


def _rendered(record: Record, tokenizer: Tokenizer, template: ChatTemplate | None) -> tuple[str, list[str]]:
    """A chat record's prompt rendering (with the generation prompt) and response texts."""
    if template is None:
        raise InvalidRecord(
            record.path,
            record.line,
            "prompt",
            "chat messages need a chat template: pass --chat-template (built-in name, tokenizer_config.json "
            "or Jinja file) or put chat_template in the tokenizer_config.json beside tokenizer.json",
            "no_chat_template",
        )
    prompt_text = ""
    responses = []
    adds_bos = tokenizer.bos_id is not None
    bos_token = tokenizer.bos_token if adds_bos or not template.builtin else None
    for k, response in enumerate(record.responses):
        try:
            prompt_text, text = template.split(list(record.prompt), response, bos_token, tokenizer.eos_token)
        except ChatTemplateError as e:
            raise InvalidRecord(
                record.path, record.line, _response_field(record, k), str(e), "chat_template"
            ) from None
        responses.append(text)
    return prompt_text, responses


def _response_field(record: Record, k: int) -> str:
    return ("chosen", "rejected")[k] if record.kind == "pair" else f"responses[{k}]"


# --- worker side -----------------------------------------------------------------------

_BLANK = "blank"
_Outcome = str | InvalidRecord | tuple[TokenizedGroup, Truncation]


@dataclass
class _WorkerState:
    path: str
    tokenizer: Tokenizer
    template: ChatTemplate | None
    options: PreprocessOptions


_state: _WorkerState | None = None


def _init_worker(path: str, tokenizer_path: str, options: PreprocessOptions) -> None:
    global _state
    tokenizer = load_tokenizer(tokenizer_path)
    _state = _WorkerState(
        path, tokenizer, resolve_chat_template(options.chat_template, tokenizer.chat_template), options
    )


@dataclass
class _ChunkResult:
    """Outcomes of a chunk of lines, in order. The chunk's first good record is checked for
    a lossless tokenizer round trip (``checked``); ``mismatch`` locates it if it failed."""

    outcomes: list[tuple[int, _Outcome]]
    checked: bool = False
    mismatch: str | None = None


def _process_chunk(chunk: list[tuple[int, bytes]]) -> _ChunkResult:
    assert _state is not None, "worker not initialized"
    result = _ChunkResult([])
    for line, raw in chunk:
        if is_blank(raw):
            result.outcomes.append((line, _BLANK))
            continue
        try:
            record = parse_record(raw, _state.path, line)
            result.outcomes.append((line, _tokenized(record)))
        except InvalidRecord as e:
            result.outcomes.append((line, e))
            continue
        if not result.checked:
            result.checked = True
            result.mismatch = _roundtrip_mismatch(record)
    return result


def _tokenized(record: Record) -> tuple[TokenizedGroup, Truncation]:
    options = _state.options
    group = tokenize_record(record, _state.tokenizer, _state.template)
    group, cut = truncate(group, options.max_prompt_len, options.max_response_len)
    if options.seq_len is not None and group.num_tokens > options.seq_len:
        raise InvalidRecord(
            record.path,
            record.line,
            "",
            f"group needs {group.num_tokens} tokens in the packed layout (prompt {len(group.prompt)}, "
            f"responses {[len(r) for r in group.responses]}) but --seq-len is {options.seq_len}; "
            "raise --seq-len or set --max-prompt-len/--max-response-len",
            "too_long",
        )
    return group, cut


def _roundtrip_mismatch(record: Record) -> str | None:
    """``file:line`` of the record if decoding the tokens of one of its texts does not give
    that text back (the tokenizer normalizes text, e.g. collapses whitespace)."""
    tokenizer = _state.tokenizer
    for text in record.texts():
        if tokenizer.decode(tokenizer.encode(text)) != text:
            return f"{record.path}:{record.line}"
    return None


# --- main side -------------------------------------------------------------------------


def _chunks(path: Path, size: int) -> Iterator[list[tuple[int, bytes]]]:
    lines = iter_lines(path)
    while chunk := list(islice(lines, size)):
        yield chunk


@contextmanager
def _ordered_map(
    path: str, tokenizer_path: str, options: PreprocessOptions
) -> Iterator[Callable[[Callable, Iterator], Iterator]]:
    """An order-preserving ``map`` over ``options.workers`` processes (in-process for 1)."""
    init_args = (path, tokenizer_path, options)
    if options.workers <= 1:
        _init_worker(*init_args)
        yield map
        return
    import multiprocessing

    with multiprocessing.get_context().Pool(options.workers, _init_worker, init_args) as pool:
        yield lambda fn, items: pool.imap(fn, items, chunksize=1)


class NoGroupsWritten(Exception):
    """Every record was dropped (with --skip-invalid) or the input holds none."""


def preprocess(
    input: str | Path, tokenizer_path: str | Path, output_dir: str | Path, options: PreprocessOptions
) -> PreprocessSummary:
    """Preprocess a JSONL file of records into a dataset directory (see module docstring).

    Raises :class:`InvalidRecord` (first bad line, unless ``options.skip_invalid``),
    :class:`UnreadableInput`, :class:`TokenizerError`, :class:`ChatTemplateError`,
    :class:`FileNotFoundError`, :class:`NoGroupsWritten` or
    :class:`~megatron_prefpack.data.group_dataset.DatasetWriteError`; on any error no dataset
    and no staging directory is left in ``output_dir``.
    """
    from tqdm import tqdm

    from megatron_prefpack.data.group_dataset import GroupDatasetWriter

    input = Path(input)
    if not input.is_file():
        raise FileNotFoundError(f"{input}: no such input file")
    tokenizer = load_tokenizer(tokenizer_path)
    template = resolve_chat_template(options.chat_template, tokenizer.chat_template)
    summary = PreprocessSummary(str(input), str(output_dir))
    with (
        _ordered_map(str(input), str(tokenizer_path), options) as ordered_map,
        GroupDatasetWriter(output_dir, tokenizer.vocab_size) as writer,
        tqdm(unit=" lines", file=sys.stderr, disable=not options.progress, dynamic_ncols=True) as bar,
    ):
        start = time.perf_counter()
        for result in ordered_map(_process_chunk, _chunks(input, options.chunk_size)):
            _collect(result, writer, summary, options)
            bar.update(len(result.outcomes))
        if not summary.groups_written:
            dropped = ", ".join(f"{k} {v}" for k, v in sorted(summary.dropped.items())) or "none"
            examples = "".join(f"\n  e.g. {e}" for e in summary.dropped_examples)
            raise NoGroupsWritten(f"{input}: no groups to write (records dropped: {dropped}){examples}")
        summary.seconds = time.perf_counter() - start
        writer.finalize(
            {
                "tokenizer": tokenizer.describe(),
                "chat_template": None if template is None else template.describe(),
                "options": {k: v for k, v in asdict(options).items() if k != "progress"},
                "summary": summary.to_dict(),
            }
        )
    return summary


def _collect(result: _ChunkResult, writer, summary: PreprocessSummary, options: PreprocessOptions) -> None:
    for line, outcome in result.outcomes:
        summary.lines_read += 1
        if outcome == _BLANK:
            summary.blank_lines += 1
        elif isinstance(outcome, InvalidRecord):
            if not options.skip_invalid:
                raise outcome
            summary.drop(outcome, options.max_examples)
        else:
            group, cut = outcome
            writer.add(group, line)
            summary.add(group, cut, line, options.max_examples)
    summary.roundtrip_checked += result.checked
    if result.mismatch is not None:
        summary.roundtrip_mismatches += 1
        summary.roundtrip_example = summary.roundtrip_example or result.mismatch


# --- command line ----------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="JSONL file of records (optionally .gz)")
    parser.add_argument(
        "--tokenizer", required=True, help="SentencePiece .model, tokenizer.json, or a directory"
    )
    parser.add_argument("--output", required=True, help="dataset directory to write")
    parser.add_argument(
        "--skip-invalid", action="store_true", help="skip and count bad records instead of stopping"
    )
    parser.add_argument(
        "--seq-len", type=_positive_int, help="row length: a longer group (after truncation) is invalid"
    )
    parser.add_argument("--max-prompt-len", type=_positive_int, help="keep only the last N prompt tokens")
    parser.add_argument(
        "--max-response-len", type=_positive_int, help="keep only the first N tokens of each response"
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=min(8, os.cpu_count() or 1),
        help="worker processes (default: CPUs, at most 8)",
    )
    parser.add_argument(
        "--chat-template",
        help="for chat-message records: built-in name (chatml, hh), a tokenizer_config.json or a Jinja file "
        "(default: chat_template of the tokenizer_config.json beside tokenizer.json)",
    )
    parser.add_argument("--chunk-size", type=_positive_int, default=256, help="lines per work item")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    options = PreprocessOptions(
        seq_len=args.seq_len,
        max_prompt_len=args.max_prompt_len,
        max_response_len=args.max_response_len,
        skip_invalid=args.skip_invalid,
        workers=args.workers,
        chat_template=args.chat_template,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
    )
    try:
        summary = preprocess(args.input, args.tokenizer, args.output, options)
    except (InvalidRecord, UnreadableInput, TokenizerError, ChatTemplateError, NoGroupsWritten, OSError) as e:
        print(f"prefpack preprocess: error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0
