"""``prefpack mode-overlap`` (Think-Fusion's mode-overlap set) on hand-made files.

Checked: the join by prompt (text and chat messages; a text prompt never matches a chat one),
counts of matched / one-sided / duplicate prompts, the first record of a duplicated prompt
wins, markers glued in front of each answer (custom markers too), ``--emit-single`` keeps
every input record with its own marker, mode checks and record-shape errors naming
file:line:field with exit code 2 (nothing written), bad markers, the single-piece tokenizer
check, and, end to end, that the preprocessed overlap set's responses start with the marker
token (one piece, right after the shared prompt).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from megatron_prefpack.cli import main
from megatron_prefpack.data.mode_overlap import (
    Markers,
    ModeOverlapError,
    build_mode_overlap,
    check_single_pieces,
    mode_error,
)
from megatron_prefpack.data.records import InvalidRecord, iter_records

THINK = "<think> reason </think> "


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sft(prompt: Any, answer: Any) -> dict:
    return {"prompt": prompt, "responses": [answer]}


@pytest.fixture
def text_sets(tmp_path: Path) -> tuple[Path, Path]:
    thinking = write_jsonl(
        tmp_path / "thinking.jsonl",
        [
            sft("A?", THINK + "a1"),
            sft("B?", "\n" + THINK + "b1"),  # leading whitespace before the block is allowed
            "",  # a blank line is not a record
            sft("A?", THINK + "a2"),  # duplicate prompt: dropped, the first record is used
            sft("D?", THINK + "d"),  # only in the thinking set
        ],
    )
    plain = write_jsonl(
        tmp_path / "plain.jsonl",
        [sft("E?", "e"), sft("B?", "b0"), sft("A?", "a0"), sft("B?", "b0 again"), sft("B?", "b0 third")],
    )
    return thinking, plain


def test_join_by_prompt_counts_and_markers(text_sets: tuple[Path, Path], tmp_path: Path) -> None:
    thinking, plain = text_sets
    out = tmp_path / "out" / "overlap.jsonl"
    counts = build_mode_overlap(thinking, plain, out)
    assert read_jsonl(out) == [
        {"prompt": "A?", "responses": ["/think" + THINK + "a1", "/no_think" + "a0"]},
        {"prompt": "B?", "responses": ["/think\n" + THINK + "b1", "/no_think" + "b0"]},
    ]
    assert counts.matched == 2
    assert (counts.thinking.records, counts.thinking.duplicates, counts.thinking.only_here) == (4, 1, 1)
    assert (counts.plain.records, counts.plain.duplicates, counts.plain.only_here) == (5, 2, 1)
    assert not (tmp_path / "out" / "overlap.jsonl.tmp").exists()
    # the output is a valid multi record file: response 0 thinking, response 1 plain
    records = [r for _, r in iter_records(out)]
    assert [(r.kind, len(r.responses)) for r in records] == [("multi", 2), ("multi", 2)]


def test_cli_prints_the_counts(text_sets: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    thinking, plain = text_sets
    out = tmp_path / "overlap.jsonl"
    code = main(["mode-overlap", "--thinking", str(thinking), "--plain", str(plain), "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "matched prompts              2" in printed
    assert f"4  records in {thinking}: 1 prompts only here (dropped), 1 duplicate-prompt records" in printed
    assert f"5  records in {plain}: 1 prompts only here (dropped), 2 duplicate-prompt records" in printed


def test_emit_single_and_custom_markers(text_sets: tuple[Path, Path], tmp_path: Path) -> None:
    thinking, plain = text_sets
    single = tmp_path / "single"
    counts = build_mode_overlap(
        thinking, plain, tmp_path / "o.jsonl", Markers("<T>", "<P>"), emit_single=single
    )
    assert counts.single == {"thinking": str(single / "thinking.jsonl"), "plain": str(single / "plain.jsonl")}
    # every record of each input (duplicates and one-sided prompts included), in file order
    assert read_jsonl(single / "thinking.jsonl") == [
        sft("A?", "<T>" + THINK + "a1"),
        sft("B?", "<T>\n" + THINK + "b1"),
        sft("A?", "<T>" + THINK + "a2"),
        sft("D?", "<T>" + THINK + "d"),
    ]
    assert [r["responses"] for r in read_jsonl(single / "plain.jsonl")] == [
        ["<P>e"], ["<P>b0"], ["<P>a0"], ["<P>b0 again"], ["<P>b0 third"]
    ]  # fmt: skip
    assert read_jsonl(tmp_path / "o.jsonl")[0]["responses"] == ["<T>" + THINK + "a1", "<P>a0"]


def test_chat_prompts_join_on_every_message_key(tmp_path: Path) -> None:
    user = [{"role": "user", "content": "Hi?"}]
    system = [{"role": "system", "content": "Be brief."}, *user]
    tagged = [{"role": "user", "content": "Hi?", "name": "x"}]
    thinking = write_jsonl(
        tmp_path / "t.jsonl",
        [
            sft(user, {"role": "assistant", "content": THINK + "hello", "extra": 1}),
            sft(system, THINK + "hi"),
            sft(tagged, THINK + "tagged"),
            sft("Hi?", THINK + "text"),  # a text prompt never matches a chat prompt
        ],
    )
    plain = write_jsonl(
        tmp_path / "p.jsonl",
        # same messages, keys in another order: equal
        [
            sft([{"content": "Hi?", "role": "user"}], "hello0"),
            sft(system, {"role": "assistant", "content": "hi0"}),
        ],
    )
    out = tmp_path / "o.jsonl"
    counts = build_mode_overlap(thinking, plain, out)
    assert (counts.matched, counts.thinking.only_here, counts.plain.only_here) == (2, 2, 0)
    assert read_jsonl(out) == [
        {
            "prompt": user,
            "responses": [
                {"role": "assistant", "content": "/think" + THINK + "hello", "extra": 1},
                {"role": "assistant", "content": "/no_thinkhello0"},
            ],
        },
        {
            "prompt": system,
            "responses": [
                {"role": "assistant", "content": "/think" + THINK + "hi"},
                {"role": "assistant", "content": "/no_thinkhi0"},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("which", "line", "field", "message"),
    [
        ("thinking", sft("Q?", "no block"), "responses[0]", "exactly one <think>...</think> block, found 0"),
        ("thinking", sft("Q?", THINK + THINK + "x"), "responses[0]", "found 2 <think> and 2 </think>"),
        ("thinking", sft("Q?", "x " + THINK + "y"), "responses[0]", "must open with <think>"),
        ("thinking", sft("Q?", "</think> x <think>"), "responses[0]", "must open with <think>"),
        ("thinking", sft("Q?", "<think> r </think>  \n"), "responses[0]", "non-blank answer after </think>"),
        (
            "thinking",
            sft("Q?", "/think" + THINK + "x"),
            "responses[0]",
            "already contains the mode marker '/think'",
        ),
        ("plain", sft("Q?", "a <think> b"), "responses[0]", "no <think>...</think> block"),
        ("plain", sft("Q?", "a </think>"), "responses[0]", "no <think>...</think> block"),
        ("plain", sft("Q?", "x /no_think"), "responses[0]", "already contains the mode marker '/no_think'"),
        (
            "plain",
            sft([{"role": "user", "content": "Q?"}], {"role": "assistant", "content": THINK + "x"}),
            "responses[0].content",
            "no <think>...</think> block",
        ),
        ("plain", {"prompt": "Q?", "responses": ["a", "b"]}, "responses", "expected one response"),
        ("plain", {"prompt": "Q?", "chosen": "a", "rejected": "b"}, "responses", "got a pair record"),
        ("plain", {"prompt": "Q?", "responses": ["a"], "scores": [1]}, "responses", "got a ranked record"),
        ("plain", {"prompt": "", "responses": ["a"]}, "prompt", "empty string"),
        ("plain", '{"prompt": "Q?", "responses": ["a"]', "", "malformed JSON"),
    ],
)
def test_bad_records_name_file_line_field(
    which: str, line: Any, field: str, message: str, tmp_path: Path, capsys
) -> None:
    good = {"thinking": sft("Q?", THINK + "x"), "plain": sft("Q?", "x")}
    files = {
        mode: write_jsonl(tmp_path / f"{mode}.jsonl", [good[mode], line] if mode == which else [good[mode]])
        for mode in good
    }
    out = tmp_path / "o.jsonl"
    with pytest.raises(InvalidRecord) as info:
        build_mode_overlap(files["thinking"], files["plain"], out)
    assert (info.value.path, info.value.line, info.value.field) == (str(files[which]), 2, field)
    assert message in info.value.reason
    argv = ["mode-overlap", "--thinking", str(files["thinking"]), "--plain", str(files["plain"])]
    assert main([*argv, "--output", str(out), "--emit-single", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefpack mode-overlap: error: {files[which]}:2: ")
    assert (f"field '{field}': " in err) == bool(field) and message in err
    assert not out.exists() and not (tmp_path / "s").exists()


def test_no_common_prompt_writes_nothing(tmp_path: Path, capsys) -> None:
    thinking = write_jsonl(tmp_path / "t.jsonl", [sft("A?", THINK + "a")])
    plain = write_jsonl(tmp_path / "p.jsonl", [sft("B?", "b")])
    out = tmp_path / "o.jsonl"
    assert (
        main(["mode-overlap", "--thinking", str(thinking), "--plain", str(plain), "--output", str(out)]) == 2
    )
    assert "no prompt is in both --thinking" in capsys.readouterr().err
    assert not out.exists()


def test_missing_file_exits_2(tmp_path: Path, capsys) -> None:
    plain = write_jsonl(tmp_path / "p.jsonl", [sft("B?", "b")])
    argv = [
        "--thinking",
        str(tmp_path / "missing.jsonl"),
        "--plain",
        str(plain),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(["mode-overlap", *argv]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("thinking", "plain", "message"),
    [
        ("/think", "/think", "neither may contain the other"),
        ("/no", "/no_think", "neither may contain the other"),
        ("", "/no_think", "--think-marker: must be non-empty"),
        ("/think", " /no_think", "--plain-marker: must be non-empty without surrounding whitespace"),
        ("<think>", "/no_think", "--think-marker: '<think>' must not contain"),
    ],
)
def test_bad_markers(thinking: str, plain: str, message: str) -> None:
    with pytest.raises(ModeOverlapError, match=message):
        Markers(thinking, plain)


def test_mode_error_accepts_valid_answers() -> None:
    markers = Markers()
    assert mode_error("<think>\nr\n</think>\n\nanswer", "thinking", markers) is None
    assert mode_error("  " + THINK + "a", "thinking", markers) is None
    assert mode_error("a plain answer", "plain", markers) is None


def test_tokenizer_single_piece_check(tmp_path: Path, sp_path: Path) -> None:
    from megatron_prefpack.data.tokenizer_training import train_tokenizer

    with pytest.raises(ModeOverlapError, match="'/think' is not a single piece"):
        check_single_pieces(sp_path, Markers())
    records = write_jsonl(tmp_path / "r.jsonl", [sft(f"question {i}?", f"answer {i}") for i in range(50)])
    symbols = Markers().pieces()
    model = train_tokenizer(records, tmp_path / "tok", 300, user_defined_symbols=symbols)
    check_single_pieces(model, Markers())
    with pytest.raises(ModeOverlapError, match="'/plain' is not a single piece"):
        check_single_pieces(model, Markers(plain="/plain"))


def test_preprocessed_responses_start_with_the_marker_token(tmp_path: Path) -> None:
    """End to end: each response of the overlap set starts, right after the shared prompt, with
    its marker's single token; the thinking one continues with ``<think>``."""
    from megatron_prefpack.data.group_dataset import GroupDataset
    from megatron_prefpack.data.preprocess import PreprocessOptions, preprocess
    from megatron_prefpack.data.tokenizer_training import train_tokenizer
    from megatron_prefpack.data.tokenizers import load_tokenizer

    prompts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(6)]
    thinking = write_jsonl(
        tmp_path / "t.jsonl", [sft(p, f"<think> think {i} </think> answer") for i, p in enumerate(prompts)]
    )
    plain = write_jsonl(tmp_path / "p.jsonl", [sft(p, f" answer {i}") for i, p in enumerate(prompts)])
    build_mode_overlap(thinking, plain, tmp_path / "o.jsonl")
    model = train_tokenizer(
        tmp_path / "o.jsonl", tmp_path / "tok", 320, user_defined_symbols=Markers().pieces()
    )
    tokenizer = load_tokenizer(model)
    preprocess(tmp_path / "o.jsonl", model, tmp_path / "data", PreprocessOptions())
    dataset = GroupDataset(tmp_path / "data")
    marker_ids = [tokenizer.encode(m) for m in ("/think", "/no_think", "<think>")]
    assert len(dataset) == len(prompts)
    for i in range(len(dataset)):
        group = dataset[i]
        assert tokenizer.decode(group.prompt.tolist()).endswith(prompts[i])
        thinking_ids, plain_ids = (r.tolist() for r in group.responses)
        assert thinking_ids[:2] == marker_ids[0] + marker_ids[2]
        assert plain_ids[:1] == marker_ids[1]
        assert tokenizer.decode(plain_ids[1:]).startswith(f" answer {i}")


def test_outputs_never_overwrite_inputs(text_sets: tuple[Path, Path], tmp_path: Path) -> None:
    thinking, plain = text_sets
    before = thinking.read_text(), plain.read_text()
    with pytest.raises(ModeOverlapError, match=r"--emit-single .* would overwrite the --thinking input"):
        build_mode_overlap(thinking, plain, tmp_path / "o.jsonl", emit_single=thinking.parent)
    with pytest.raises(ModeOverlapError, match="--output would overwrite the --plain input"):
        build_mode_overlap(thinking, plain, plain)
    assert (thinking.read_text(), plain.read_text()) == before
    assert not (tmp_path / "o.jsonl").exists()
