"""Record parsing: every accepted shape, and every kind of bad line named by file, line and field."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import pytest

from megatron_prefpack.data.records import (
    ASSISTANT_MARKER,
    MAX_JSON_DEPTH,
    InvalidRecord,
    UnreadableInput,
    iter_lines,
    iter_records,
    parse_record,
)
from tests.fixtures.tokenizer_files import hh_lines

PATH = "data.jsonl"


def parse(obj: object, line: int = 7) -> object:
    return parse_record(json.dumps(obj).encode(), PATH, line)


def test_plain_pair_with_margin() -> None:
    record = parse(
        {"prompt": "Q?", "chosen": " yes", "rejected": " no", "margin": 2, "id": "extra keys ignored"}
    )
    assert record.kind == "pair" and not record.is_chat
    assert record.prompt == "Q?" and record.responses == (" yes", " no")
    assert record.scores == (1.0, 0.0) and record.margin == 2.0
    assert (record.path, record.line) == (PATH, 7)


def test_chat_pair_wraps_string_responses_and_keeps_message_keys() -> None:
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chosen = {"role": "assistant", "content": "Hello", "reasoning_content": "greet"}
    record = parse({"prompt": prompt, "chosen": chosen, "rejected": "Go away"})
    assert record.is_chat and record.prompt == tuple(prompt)
    assert record.responses == (chosen, {"role": "assistant", "content": "Go away"})
    assert record.margin is None


def test_implicit_prompt_pairs_from_bundled_hh_file() -> None:
    for line in hh_lines(20):
        obj = json.loads(line)
        record = parse_record(line.encode(), PATH, 1)
        assert record.kind == "pair"
        assert record.prompt.endswith(ASSISTANT_MARKER)
        # nothing is lost or changed: prompt + response is exactly the original conversation
        assert record.prompt + record.responses[0] == obj["chosen"]
        assert record.prompt + record.responses[1] == obj["rejected"]
        assert ASSISTANT_MARKER not in record.responses[0] + record.responses[1]


def test_implicit_prompt_cut_back_to_turn_boundary() -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: Hello there"
    rejected = "\n\nHuman: hi\n\nAssistant: Help"
    record = parse({"chosen": chosen, "rejected": rejected})
    assert record.prompt == "\n\nHuman: hi\n\nAssistant:"
    assert record.responses == (" Hello there", " Help")


def test_implicit_chat_pair() -> None:
    user = {"role": "user", "content": "Hi"}
    good, bad = {"role": "assistant", "content": "Hello"}, {"role": "assistant", "content": "No"}
    record = parse({"chosen": [user, good], "rejected": [user, bad]})
    assert record.prompt == (user,) and record.responses == (good, bad)


def test_ranked_and_multi() -> None:
    ranked = parse({"prompt": "Q", "responses": ["a", "b", "c"], "scores": [0.5, -1, 3]})
    assert ranked.kind == "ranked" and ranked.scores == (0.5, -1.0, 3.0) and len(ranked.responses) == 3
    multi = parse({"prompt": [{"role": "user", "content": "Q"}], "responses": ["<think>x</think>A", "A"]})
    assert multi.kind == "multi" and multi.scores is None
    assert multi.responses[0] == {"role": "assistant", "content": "<think>x</think>A"}


BAD_RECORDS = [
    ({"prompt": "Q", "chosen": "a"}, "rejected", "missing_field"),
    ({"prompt": "Q", "rejected": "a"}, "chosen", "missing_field"),
    ({"responses": ["a"]}, "prompt", "missing_field"),
    ({"prompt": "Q"}, "", "missing_field"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty_field"),
    ({"prompt": "Q", "chosen": "", "rejected": "b"}, "chosen", "empty_field"),
    ({"prompt": "Q", "responses": []}, "responses", "empty_field"),
    ({"prompt": [], "responses": ["a"]}, "prompt", "empty_field"),
    ({"prompt": [{"role": "user", "content": ""}], "responses": ["a"]}, "prompt[0].content", "empty_field"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "wrong_type"),
    ({"prompt": "Q", "chosen": ["a"], "rejected": "b"}, "chosen", "wrong_type"),
    (
        {"prompt": "Q", "chosen": {"role": "assistant", "content": "a"}, "rejected": "b"},
        "chosen",
        "wrong_type",
    ),
    ({"prompt": [{"role": "user"}], "responses": ["a"]}, "prompt[0].content", "missing_field"),
    ({"prompt": [{"role": "user", "content": ["x"]}], "responses": ["a"]}, "prompt[0].content", "wrong_type"),
    (
        {"prompt": [{"role": "user", "content": "Q"}], "responses": [{"role": "user", "content": "a"}]},
        "responses[0].role",
        "bad_value",
    ),
    ({"prompt": "Q", "responses": ["a", 5]}, "responses[1]", "wrong_type"),
    ({"prompt": "Q", "responses": "a"}, "responses", "wrong_type"),
    ({"prompt": "Q", "responses": ["a", "b"], "scores": [1]}, "scores", "bad_value"),
    ({"prompt": "Q", "responses": ["a", "b"], "scores": [1, "2"]}, "scores[1]", "wrong_type"),
    ({"prompt": "Q", "responses": ["a", "b"], "scores": "12"}, "scores", "wrong_type"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": True}, "margin", "wrong_type"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": None}, "margin", "wrong_type"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "totally different"}, "chosen", "no_prompt"),
    (
        {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: b"},
        "chosen",
        "empty_field",
    ),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": []}, "rejected", "wrong_type"),
    ([1, 2], "", "wrong_type"),
]


@pytest.mark.parametrize(("obj", "field", "category"), BAD_RECORDS)
def test_bad_record_names_file_line_and_field(obj: object, field: str, category: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        parse(obj, line=42)
    error = info.value
    assert (error.path, error.line, error.field, error.category) == (PATH, 42, field, category)
    assert str(error).startswith(f"{PATH}:42: ")
    if field:
        assert f"field '{field}'" in str(error)


def test_non_finite_score_is_rejected() -> None:
    with pytest.raises(InvalidRecord, match="scores\\[0\\]"):
        parse_record(b'{"prompt": "Q", "responses": ["a"], "scores": [NaN]}', PATH, 1)


def test_malformed_json_and_non_utf8() -> None:
    with pytest.raises(InvalidRecord, match=f"^{PATH}:3: malformed JSON") as info:
        parse_record(b'{"prompt": "Q", "chosen": ', PATH, 3)
    assert info.value.category == "bad_json"
    with pytest.raises(InvalidRecord, match=f"^{PATH}:4: not valid UTF-8 \\(byte 12\\)") as info:
        parse_record(b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}', PATH, 4)
    assert info.value.category == "not_utf8"


def test_invalid_record_survives_pickling() -> None:
    error = InvalidRecord(PATH, 5, "chosen", "empty string", "empty_field")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.line, copy.field, copy.reason, copy.category) == (
        PATH,
        5,
        "chosen",
        "empty string",
        "empty_field",
    )
    assert str(copy) == str(error)


def write_lines(path: Path, lines: list[bytes]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("name", ["records.jsonl", "records.jsonl.gz"])
def test_iter_records_line_numbers_blank_lines_and_errors(tmp_path: Path, name: str) -> None:
    good = json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}).encode()
    path = write_lines(tmp_path / name, [good, b"", b"  ", good, b"{bad", good])
    with pytest.raises(InvalidRecord) as info:
        list(iter_records(path))
    assert (info.value.path, info.value.line) == (str(path), 5)

    skipped: list[InvalidRecord] = []
    lines = [line for line, _ in iter_records(path, on_invalid=skipped.append)]
    assert lines == [1, 4, 6]
    assert [e.line for e in skipped] == [5]


def nested(depth: int) -> bytes:
    """A pair whose ignored key ``x`` holds lists nested so that the record is ``depth`` levels deep."""
    inner = depth - 1
    return b'{"prompt": "Q", "chosen": "a", "rejected": "b", "x": ' + b"[" * inner + b"]" * inner + b"}"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_deeply_nested_json_is_an_invalid_record(depth: int) -> None:
    # 100,000 levels is deeper than json's parser recurses (RecursionError), 101 parses but is refused
    with pytest.raises(InvalidRecord) as info:
        parse_record(nested(depth), PATH, 6)
    assert (info.value.field, info.value.category) == ("<record>", "too_deep")
    assert str(info.value) == f"{PATH}:6: field '<record>': nested deeper than {MAX_JSON_DEPTH} levels"
    assert parse_record(nested(MAX_JSON_DEPTH), PATH, 6).responses == ("a", "b")


def gzip_lines(path: Path, count: int) -> bytes:
    """Compressed bytes of ``count`` numbered records (the ``.gz`` file is written too)."""
    data = gzip.compress(
        b"".join(
            json.dumps({"prompt": f"Q{i} " * 40, "chosen": "a", "rejected": "b"}).encode() + b"\n"
            for i in range(count)
        )
    )
    path.write_bytes(data)
    return data


def read_until_error(path: Path) -> tuple[int, UnreadableInput]:
    last = 0
    with pytest.raises(UnreadableInput) as info:
        for last, _ in iter_lines(path):  # noqa: B007 (last is read after the loop)
            pass
    return last, info.value


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[: len(data) // 2], "the compressed stream ends early"),
        (lambda data: data[:-4], "the compressed stream ends early"),
        (lambda data: data[:-8] + bytes(8), "corrupt compressed data: CRC check failed"),
        (lambda data: b"plain text\n", "corrupt compressed data: Not a gzipped file"),
    ],
)
def test_unreadable_gzip_names_the_file_and_the_last_good_line(tmp_path: Path, damage, reason: str) -> None:
    path = tmp_path / "records.jsonl.gz"
    path.write_bytes(damage(gzip_lines(path, 3000)))
    last, error = read_until_error(path)
    assert error.last_line == last and error.path == str(path)
    assert str(error).startswith(f"{path}:{last + 1}: cannot read past line {last}: {reason}")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.last_line == last


def test_unreadable_input_is_not_skipped_as_an_invalid_record(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl.gz"
    path.write_bytes(gzip_lines(path, 3000)[:-4])
    skipped: list[InvalidRecord] = []
    with pytest.raises(UnreadableInput, match=r"cannot read past line 3000"):
        list(iter_records(path, on_invalid=skipped.append))
    assert not skipped
