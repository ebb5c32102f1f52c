"""``prefpack preprocess``: tokenization, the on-disk dataset, bad input, truncation, workers."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_prefpack.cli import main
from megatron_prefpack.data.chat_templates import resolve_chat_template
from megatron_prefpack.data.group_dataset import KINDS, GroupDataset, content_fingerprint
from megatron_prefpack.data.preprocess import PreprocessOptions, preprocess, tokenize_record
from megatron_prefpack.data.records import InvalidRecord, iter_records, parse_record
from megatron_prefpack.data.tokenizers import load_tokenizer
from tests.fixtures.tokenizer_files import HH_FILE, hh_lines

USER = {"role": "user", "content": "What is a pen?"}
RECORDS = [
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Seven.", "margin": 0.5},
    {"prompt": [USER], "chosen": "A writing tool.", "rejected": {"role": "assistant", "content": "A fish."}},
    {"prompt": "Rank these.", "responses": [" first", " second", " third"], "scores": [2.0, 1.0, -1.0]},
    {"prompt": [USER], "responses": ["<think>It writes.</think>A writing tool.", "A writing tool."]},
]


def write_jsonl(path: Path, records: list, extra_lines: dict[int, bytes] | None = None) -> Path:
    """One JSON record per line; ``extra_lines`` inserts raw lines at the given 1-based numbers."""
    lines = [json.dumps(r).encode() for r in records]
    for number, raw in sorted((extra_lines or {}).items()):
        lines.insert(number - 1, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def mixed_file(tmp_path: Path) -> Path:
    hh = [json.loads(line) for line in hh_lines(6)]
    return write_jsonl(tmp_path / "mixed.jsonl", RECORDS + hh)


def run_cli(*args: str) -> int:
    return main(["preprocess", "--no-progress", *args])


def test_tokenize_text_pair(sp_path: Path) -> None:
    tokenizer = load_tokenizer(sp_path)
    record = parse_record(json.dumps(RECORDS[0]).encode(), "f", 1)
    group = tokenize_record(record, tokenizer, None, group_id=3)
    assert group.group_id == 3 and group.kind == "pair" and group.scores == [1.0, 0.0] and group.margin == 0.5
    assert group.prompt.dtype == np.int32
    assert group.prompt.tolist() == [tokenizer.bos_id, *tokenizer.encode("Name a colour.")]
    assert [r.tolist() for r in group.responses] == [
        [*tokenizer.encode(" Blue."), tokenizer.eos_id],
        [*tokenizer.encode(" Seven."), tokenizer.eos_id],
    ]


def test_tokenize_chat_record_with_builtin_template(sp_path: Path) -> None:
    tokenizer = load_tokenizer(sp_path)
    record = parse_record(json.dumps(RECORDS[3]).encode(), "f", 1)
    group = tokenize_record(record, tokenizer, resolve_chat_template("chatml", None))
    assert group.kind == "multi" and group.scores is None
    prompt_text = "<|im_start|>user\nWhat is a pen?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(group.prompt[1:]) == prompt_text
    assert tokenizer.decode(group.responses[1][:-1]) == "A writing tool.<|im_end|>\n"
    assert group.responses[0][-1] == tokenizer.eos_id


def test_chat_template_bos_token_becomes_a_single_bos_id(hf_dir: Path, sp_path: Path) -> None:
    """The template renders ``<s>``: one BOS id, for a tokenizer that adds none to plain text
    (the HF fixture) and for one that does (SentencePiece, which does not parse ``<s>`` itself)."""
    tokenizer = load_tokenizer(hf_dir)
    template = resolve_chat_template(None, tokenizer.chat_template)
    record = parse_record(json.dumps(RECORDS[1]).encode(), "f", 1)
    group = tokenize_record(record, tokenizer, template)
    bos = tokenizer.encode("<s>")
    assert tokenizer.bos_id is None and bos == [1]
    assert group.prompt[:1].tolist() == bos and 1 not in group.prompt[1:].tolist()
    assert (
        tokenizer.decode(group.prompt)
        == "<s><|im_start|>user\nWhat is a pen?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(group.responses[1]) == "A fish.<|im_end|>\n</s>"

    sp = load_tokenizer(sp_path)
    group = tokenize_record(record, sp, template)
    assert group.prompt[0] == sp.bos_id and sp.bos_id not in group.prompt[1:].tolist()
    assert (
        sp.decode(group.prompt[1:]) == "<|im_start|>user\nWhat is a pen?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_hh_text_pair_and_hh_chat_record_give_the_same_tokens(sp_path: Path) -> None:
    tokenizer = load_tokenizer(sp_path)
    text = parse_record(hh_lines(1)[0].encode(), "f", 1)
    parts = re.split(r"\n\n(Human|Assistant):", text.prompt)  # ["", role, " content", ..., "Assistant", ""]
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [
        {"role": roles[r], "content": c[1:]} for r, c in zip(parts[1:-2:2], parts[2:-2:2], strict=True)
    ]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2 + ["user"]
    chat = parse_record(
        json.dumps(
            {"prompt": messages, "chosen": text.responses[0][1:], "rejected": text.responses[1][1:]}
        ).encode(),
        "f",
        1,
    )
    a = tokenize_record(text, tokenizer, None)
    b = tokenize_record(chat, tokenizer, resolve_chat_template("hh", None))
    assert a.prompt.tolist() == b.prompt.tolist()
    assert [r.tolist() for r in a.responses] == [r.tolist() for r in b.responses]


def test_chat_record_without_template_is_invalid(sp_path: Path) -> None:
    record = parse_record(json.dumps(RECORDS[1]).encode(), "f", 9)
    with pytest.raises(InvalidRecord, match=r"^f:9: field 'prompt': chat messages need a chat template"):
        tokenize_record(record, load_tokenizer(sp_path), None)


def test_round_trip_every_format(sp_path: Path, mixed_file: Path, tmp_path: Path) -> None:
    options = PreprocessOptions(chat_template="chatml", workers=1)
    summary = preprocess(mixed_file, sp_path, tmp_path / "ds", options)
    assert summary.groups_written == 10 and summary.kinds == {"pair": 8, "ranked": 1, "multi": 1}
    assert summary.groups_dropped == 0 and summary.roundtrip_mismatches == 0

    dataset = GroupDataset(tmp_path / "ds")
    tokenizer = load_tokenizer(sp_path)
    template = resolve_chat_template("chatml", None)
    expected = [
        tokenize_record(r, tokenizer, template, i) for i, (_, r) in enumerate(iter_records(mixed_file))
    ]
    assert len(dataset) == len(expected) == 10
    for i, want in enumerate(expected):
        got = dataset[i]
        assert got.group_id == i and got.prompt.dtype == np.int32
        assert got.prompt.tolist() == want.prompt.tolist()
        assert [r.tolist() for r in got.responses] == [r.tolist() for r in want.responses]
        assert (got.kind, got.scores, got.margin, got.meta["line"]) == (
            want.kind,
            want.scores,
            want.margin,
            i + 1,
        )
    assert dataset[-1].group_id == 9
    with pytest.raises(IndexError):
        dataset[10]

    lengths = dataset.token_lengths()
    assert lengths.prompt.tolist() == [len(g.prompt) for g in expected]
    assert lengths.num_responses.tolist() == [len(g.responses) for g in expected]
    assert lengths.response.tolist() == [len(r) for g in expected for r in g.responses]
    assert lengths.packed.tolist() == [g.num_tokens for g in expected]
    assert int(lengths.packed.sum()) == summary.packed_tokens

    info = dataset.info
    assert info["num_groups"] == 10 and info["token_dtype"] == "uint16"
    assert info["tokenizer"] == tokenizer.describe() and info["chat_template"]["name"] == "chatml"
    assert info["summary"]["groups_written"] == 10 and info["options"]["chat_template"] == "chatml"

    copy = pickle.loads(pickle.dumps(dataset))
    assert copy[2].responses[2].tolist() == dataset[2].responses[2].tolist()


def test_kinds_and_response_scores_without_materialising_groups(
    sp_path: Path, mixed_file: Path, tmp_path: Path
) -> None:
    preprocess(mixed_file, sp_path, tmp_path / "ds", PreprocessOptions(chat_template="chatml"))
    dataset = GroupDataset(tmp_path / "ds")
    assert dataset.kinds.dtype == np.uint8 and dataset.kinds.shape == (10,)
    assert [KINDS[k] for k in dataset.kinds] == [dataset[i].kind for i in range(10)]
    assert dataset.response_scores(0).tolist() == [1.0, 0.0]
    assert dataset.response_scores(2).dtype == np.float64 and dataset.response_scores(2).tolist() == [
        2.0,
        1.0,
        -1.0,
    ]
    assert np.isnan(dataset.response_scores(3)).all() and dataset.response_scores(-1).tolist() == [1.0, 0.0]
    with pytest.raises(IndexError):
        dataset.response_scores(10)
    with pytest.raises(ValueError, match="read-only"):
        dataset.kinds[0] = 2
    with pytest.raises(ValueError, match="read-only"):
        dataset.response_scores(0)[0] = 0.0
    assert dataset.vocab_size == load_tokenizer(sp_path).vocab_size and dataset.pad_id == 3


def test_fingerprint_identifies_the_content(sp_path: Path, mixed_file: Path, tmp_path: Path) -> None:
    preprocess(mixed_file, sp_path, tmp_path / "ds", PreprocessOptions(chat_template="chatml"))
    info_path = tmp_path / "ds" / "dataset.json"
    recorded = json.loads(info_path.read_text())["fingerprint"]
    assert re.fullmatch("[0-9a-f]{64}", recorded)
    assert GroupDataset(tmp_path / "ds").fingerprint == recorded == content_fingerprint(tmp_path / "ds")

    # a dataset written before the field existed: computed from the files, the same value
    info = json.loads(info_path.read_text())
    del info["fingerprint"]
    info_path.write_text(json.dumps(info))
    assert GroupDataset(tmp_path / "ds").fingerprint == recorded

    # other options, other data: another fingerprint; one token changed: another fingerprint
    preprocess(
        mixed_file, sp_path, tmp_path / "cut", PreprocessOptions(chat_template="chatml", max_response_len=3)
    )
    assert GroupDataset(tmp_path / "cut").fingerprint != recorded
    tokens = bytearray((tmp_path / "ds" / "groups.bin").read_bytes())
    tokens[0] ^= 1
    (tmp_path / "ds" / "groups.bin").write_bytes(bytes(tokens))
    assert content_fingerprint(tmp_path / "ds") != recorded


def test_files_are_a_megatron_indexed_dataset(sp_path: Path, mixed_file: Path, tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    preprocess(mixed_file, sp_path, tmp_path / "ds", PreprocessOptions(chat_template="chatml"))
    indexed = IndexedDataset(str(tmp_path / "ds" / "groups"))
    dataset = GroupDataset(tmp_path / "ds")
    assert len(indexed.document_indices) - 1 == len(dataset)
    assert len(indexed) == sum(1 + len(dataset[i].responses) for i in range(len(dataset)))
    assert indexed[indexed.document_indices[2]].tolist() == dataset[2].prompt.tolist()


def test_worker_count_does_not_change_output(hf_dir: Path, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS * 3 + [json.loads(line) for line in hh_lines(20)])
    for workers in (1, 2):
        options = PreprocessOptions(workers=workers, chunk_size=3, skip_invalid=True, max_response_len=40)
        preprocess(source, hf_dir, tmp_path / f"w{workers}", options)
    for name in ("groups.bin", "groups.idx", "kinds.npy", "margins.npy", "lines.npy", "scores.npy"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    assert GroupDataset(tmp_path / "w1").fingerprint == GroupDataset(tmp_path / "w2").fingerprint
    one, two = (json.loads((tmp_path / f"w{w}" / "dataset.json").read_text())["summary"] for w in (1, 2))
    for key in ("groups_written", "packed_tokens", "responses_truncated", "dropped"):
        assert one[key] == two[key]


BAD_LINES = [
    (b'{"prompt": "Q", "chosen": "a"', "", "malformed JSON"),
    (b'{"prompt": "Q\xff", "chosen": "a", "rejected": "b"}', "", "not valid UTF-8"),
    (b'{"prompt": "Q", "chosen": "a"}', "rejected", "missing"),
    (b'{"prompt": "Q", "chosen": "", "rejected": "b"}', "chosen", "empty string"),
    (b'{"prompt": "Q", "responses": ["a", "b"], "scores": [1, "x"]}', "scores[1]", "expected a number"),
]


@pytest.mark.parametrize(("raw", "field", "reason"), BAD_LINES)
def test_bad_input_stops_with_file_line_and_field(
    sp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes, field: str, reason: str
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1] * 3, {3: raw})
    out = tmp_path / "ds"
    assert (
        run_cli("--input", str(source), "--tokenizer", str(sp_path), "--output", str(out), "--workers", "1")
        == 2
    )
    err = capsys.readouterr().err
    assert f"{source}:3: " in err and reason in err and "Traceback" not in err
    if field:
        assert f"field '{field}'" in err
    assert not (out / "dataset.json").exists() and not list(out.glob("groups.*"))
    assert not list(out.glob(".staging-*")), "a failed run leaves no staging directory behind"


def test_group_longer_than_the_row_is_invalid(
    sp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_jsonl(
        tmp_path / "in.jsonl", [RECORDS[0], {"prompt": "Q " * 40, "chosen": "a", "rejected": "b"}]
    )
    args = ["--input", str(source), "--tokenizer", str(sp_path), "--workers", "1", "--seq-len", "30"]
    assert run_cli(*args, "--output", str(tmp_path / "a")) == 2
    err = capsys.readouterr().err
    assert f"{source}:2: group needs" in err and "--seq-len is 30" in err

    assert run_cli(*args, "--output", str(tmp_path / "b"), "--skip-invalid") == 0
    assert "too_long: 1" in capsys.readouterr().out
    assert run_cli(*args, "--output", str(tmp_path / "c"), "--max-prompt-len", "10") == 0
    assert len(GroupDataset(tmp_path / "c")) == 2


def test_skip_invalid_counts_and_lists_examples(
    sp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = {
        2: b"{oops",
        4: b"",
        5: b'{"prompt": "Q", "chosen": "a"}',
        7: b'{"prompt": 1, "chosen": "a", "rejected": "b"}',
    }
    extra[8] = b'{"prompt": "Q", "chosen": "", "rejected": "b"}'
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1] * 4, extra)
    out = tmp_path / "ds"
    assert (
        run_cli(
            "--input",
            str(source),
            "--tokenizer",
            str(sp_path),
            "--output",
            str(out),
            "--skip-invalid",
            "--workers",
            "1",
        )
        == 0
    )
    printed = capsys.readouterr().out
    summary = GroupDataset(out).info["summary"]
    assert summary["groups_written"] == 4 and summary["blank_lines"] == 1 and summary["lines_read"] == 9
    assert summary["dropped"] == {"bad_json": 1, "missing_field": 1, "wrong_type": 1, "empty_field": 1}
    assert summary["groups_dropped"] == 4
    assert [e.split(": ")[0] for e in summary["dropped_examples"]] == [f"{source}:{n}" for n in (2, 5, 7, 8)]
    assert "groups dropped      4" in printed and f"e.g. {source}:5: field 'rejected': missing" in printed
    assert GroupDataset(out)._lines.tolist() == [1, 3, 6, 9]


def test_everything_dropped_is_an_error(
    sp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q"}])
    assert (
        run_cli(
            "--input",
            str(source),
            "--tokenizer",
            str(sp_path),
            "--output",
            str(tmp_path / "o"),
            "--skip-invalid",
        )
        == 2
    )
    assert "no groups to write (records dropped: missing_field 1)" in capsys.readouterr().err


def test_truncation_counts(sp_path: Path, tmp_path: Path) -> None:
    records = [json.loads(line) for line in hh_lines(30)]
    source = write_jsonl(tmp_path / "hh.jsonl", records)
    tokenizer = load_tokenizer(sp_path)
    full = [tokenize_record(r, tokenizer, None) for _, r in iter_records(source)]
    options = PreprocessOptions(max_prompt_len=60, max_response_len=25)
    summary = preprocess(source, sp_path, tmp_path / "ds", options)
    assert summary.prompts_truncated == sum(len(g.prompt) > 60 for g in full) > 0
    assert summary.prompt_tokens_cut == sum(max(0, len(g.prompt) - 60) for g in full)
    assert summary.responses_truncated == sum(len(r) > 25 for g in full for r in g.responses) > 0
    assert summary.response_tokens_cut == sum(max(0, len(r) - 25) for g in full for r in g.responses)
    dataset = GroupDataset(tmp_path / "ds")
    for i, g in enumerate(full):
        assert dataset[i].prompt.tolist() == g.prompt[-60:].tolist()  # the prompt keeps its end
        assert [r.tolist() for r in dataset[i].responses] == [r[:25].tolist() for r in g.responses]


def test_bundled_hh_file_end_to_end(
    sp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hh"
    assert (
        run_cli("--input", str(HH_FILE), "--tokenizer", str(sp_path), "--output", str(out), "--workers", "1")
        == 0
    )
    printed = capsys.readouterr().out
    assert "groups written      2,312 (pair 2,312)" in printed and "groups/s" in printed
    dataset = GroupDataset(out)
    assert len(dataset) == 2312
    lengths = dataset.token_lengths()
    assert (lengths.num_responses == 2).all() and (lengths.prompt >= 2).all()
    first = json.loads(hh_lines(1)[0])
    tokenizer = load_tokenizer(sp_path)
    group = dataset[0]
    assert tokenizer.decode(group.prompt) + tokenizer.decode(group.responses[0][:-1]) == first["chosen"]


def test_lossy_tokenizer_is_reported(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenizers import Tokenizer, normalizers

    lossy = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    lossy.normalizer = normalizers.Lowercase()
    (tmp_path / "tok").mkdir()
    lossy.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_bytes((hf_dir / "tokenizer_config.json").read_bytes())
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1] * 5)
    args = [
        "--input",
        str(source),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--workers",
        "1",
        "--chunk-size",
        "2",
    ]
    assert run_cli(*args, "--output", str(tmp_path / "ds")) == 0
    assert f"WARNING: tokenizer does not reproduce the text for 3 of 3 sampled records (e.g. {source}:1)" in (
        capsys.readouterr().out
    )


def test_identical_responses_are_kept_and_counted(
    sp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [
        RECORDS[0],
        {"prompt": "Same?", "chosen": " Yes.", "rejected": " Yes."},
        {"prompt": "Rank.", "responses": [" a", " b", " a"], "scores": [1, 2, 3]},
        {"prompt": "Cut.", "chosen": " Blue sky today", "rejected": " Blue sea today"},
        RECORDS[2],
    ]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    tokenizer = load_tokenizer(sp_path)
    sky, sea = tokenizer.encode(" Blue sky today"), tokenizer.encode(" Blue sea today")
    shared = next(i for i, (a, b) in enumerate(zip(sky, sea, strict=False)) if a != b)  # cut to this, equal
    assert shared > 0
    args = ["--input", str(source), "--tokenizer", str(sp_path), "--workers", "1"]
    assert run_cli(*args, "--output", str(tmp_path / "ds"), "--max-response-len", str(shared)) == 0
    printed = capsys.readouterr().out
    summary = GroupDataset(tmp_path / "ds").info["summary"]
    assert summary["groups_written"] == 5
    assert summary["identical_responses"] == {"pair": 2, "ranked": 1}
    assert summary["identical_examples"] == [f"{source}:{n}" for n in (2, 3, 4)]
    assert f"identical responses 3 groups (pair 2, ranked 1; kept), e.g. {source}:2, {source}:3" in printed

    assert run_cli(*args, "--output", str(tmp_path / "full")) == 0
    assert GroupDataset(tmp_path / "full").info["summary"]["identical_responses"] == {"pair": 1, "ranked": 1}
    assert "identical responses 2 groups" in capsys.readouterr().out
