"""``prefpack train-tokenizer``: a small SentencePiece model from the text of preference records.

Trains on every text of every record (prompts, responses, message contents; any record
shape of ``records``). The model is lossless on its own training text: no normalization,
whitespace kept as is (no dummy prefix, no collapsing), unknown characters fall back to
bytes. Special ids: unk 0, bos 1, eos 2, pad 3; user-defined symbols (always one piece, e.g.
Think-Fusion's mode markers) follow from 4. Writes ``PREFIX.model`` and ``PREFIX.vocab``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from megatron_prefpack.data.records import InvalidRecord, UnreadableInput, iter_records

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def record_texts(path: str | Path) -> Iterator[str]:
    """Every text of every record in ``path``; raises :class:`InvalidRecord` on a bad line and
    :class:`UnreadableInput` on a file that cannot be read to its end."""
    for _, record in iter_records(path):
        yield from record.texts()


def train_tokenizer(
    input: str | Path,
    output_prefix: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    threads: int = 2,
    user_defined_symbols: Sequence[str] = (),
) -> Path:
    """Train and write ``output_prefix.model``/``.vocab``; returns the ``.model`` path.

    ``user_defined_symbols`` (e.g. Think-Fusion's ``/think``, ``/no_think``, ``<think>``,
    ``</think>``) get ids 4, 5, ... and are always one piece, wherever they occur in a text."""
    import sentencepiece

    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    texts = list(record_texts(input))
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts),
        model_prefix=str(output_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=max((len(t.encode()) for t in texts), default=0) + 1,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        user_defined_symbols=list(user_defined_symbols),
        num_threads=threads,
        minloglevel=2,
    )
    return output_prefix.with_suffix(output_prefix.suffix + ".model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="JSONL file of records (optionally .gz)")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (default 8000)")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--threads", type=int, default=2, help="trainer threads")
    parser.add_argument(
        "--user-defined-symbols",
        nargs="+",
        default=[],
        metavar="SYMBOL",
        help="strings that are always one piece (ids 4, 5, ...), e.g. /think /no_think '<think>' '</think>'",
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        model = train_tokenizer(
            args.input, args.output, args.vocab_size, args.model_type, args.threads, args.user_defined_symbols
        )
    # SentencePiece reports bad settings (e.g. a vocabulary too large) as RuntimeError.
    except (InvalidRecord, UnreadableInput, OSError, RuntimeError) as e:
        print(f"prefpack train-tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {model} (vocab {args.vocab_size}) in {time.perf_counter() - start:.1f} s")
    return 0
