"""Tokenizers from local files, chat templates, and ``prefpack train-tokenizer``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_prefpack.cli import main
from megatron_prefpack.data.chat_templates import ChatTemplateError, resolve_chat_template
from megatron_prefpack.data.records import parse_record
from megatron_prefpack.data.tokenizers import TokenizerError, load_tokenizer
from tests.fixtures.tokenizer_files import HF_CHAT_TEMPLATE, hh_lines

TEXTS = [
    "\n\nHuman: what are some pranks?\n\nAssistant: Are you  looking for   ideas?",
    " leading space, trailing space ",
    "digits 12345, unicode café ☃ 日本語, tabs\tand\r\nCRLF",
]


def test_sentencepiece_ids_and_lossless_round_trip(sp_path: Path) -> None:
    tokenizer = load_tokenizer(sp_path)
    assert (tokenizer.kind, tokenizer.vocab_size) == ("sentencepiece", 1000)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.chat_template) == ("<s>", "</s>", None)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids and tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
        assert tokenizer.decode(ids) == text


def test_huggingface_tokenizer_from_file_and_directory(hf_dir: Path) -> None:
    by_file = load_tokenizer(hf_dir / "tokenizer.json")
    by_dir = load_tokenizer(hf_dir)
    assert by_file.describe() == by_dir.describe()
    assert by_file.kind == "huggingface" and by_file.vocab_size == 600
    # the config names a bos_token but the tokenizer.json has no post-processor: no BOS is added
    assert (by_file.pad_id, by_file.bos_id, by_file.eos_id, by_file.bos_token) == (0, None, 2, "<s>")
    assert by_file.chat_template == HF_CHAT_TEMPLATE
    for text in TEXTS:
        assert by_file.decode(by_file.encode(text)) == text
    assert by_file.encode("<|im_start|>") == [3]


def test_describe_identifies_the_file(sp_path: Path, hf_dir: Path) -> None:
    import hashlib

    for path in (sp_path, hf_dir / "tokenizer.json"):
        description = load_tokenizer(path).describe()
        assert description["path"] == str(path.resolve())
        assert description["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert {"type", "vocab_size", "bos_id", "eos_id", "pad_id"} <= description.keys()


def test_huggingface_without_config_uses_conventional_names(hf_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.chat_template) == (
        0,
        None,
        2,
        None,
    )
    assert tokenizer.bos_token == "<s>"

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.bos_token) == (4, None, "<s>")

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="'<nope>' is not in the vocabulary"):
        load_tokenizer(tmp_path)


def test_tokenizer_without_eos_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(TokenizerError, match="cannot tell the EOS token"):
        load_tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("missing.model", "no such tokenizer file"),
        ("vocab.txt", "unknown tokenizer file type"),
        ("empty", "neither"),
    ],
)
def test_bad_tokenizer_paths(tmp_path: Path, name: str, match: str) -> None:
    if name == "vocab.txt":
        (tmp_path / name).write_text("a\n")
    if name == "empty":
        (tmp_path / name).mkdir()
    with pytest.raises(TokenizerError, match=match):
        load_tokenizer(tmp_path / name)


def test_corrupt_sentencepiece_model(tmp_path: Path) -> None:
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
REPLY = {"role": "assistant", "content": "Hello!"}


def test_builtin_chatml() -> None:
    template = resolve_chat_template("chatml", None)
    prompt, response = template.split(CHAT, REPLY)
    assert (
        prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert response == "Hello!<|im_end|>\n"


def test_builtin_hh_matches_the_bundled_text_format() -> None:
    """Rendering an HH conversation as chat messages gives exactly the implicit-prompt split."""
    record = parse_record(
        json.dumps(
            {
                "chosen": "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: d!",
                "rejected": "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: e",
            }
        ).encode(),
        "x",
        1,
    )
    messages = [
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "b."},
        {"role": "user", "content": "c?"},
    ]
    template = resolve_chat_template("hh", None)
    assert template.split(messages, {"role": "assistant", "content": "d!"}) == (
        record.prompt,
        record.responses[0],
    )
    line = json.loads(hh_lines(1)[0])
    assert line["chosen"].startswith(
        template.render([{"role": "user", "content": "what are some pranks with a pen i can do?"}], True)
    )
    with pytest.raises(ChatTemplateError, match="only user and assistant turns, got system"):
        template.render(CHAT, True)


def test_template_from_tokenizer_config_and_jinja_file(hf_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(hf_dir)
    default = resolve_chat_template(None, tokenizer.chat_template)
    explicit = resolve_chat_template(str(hf_dir / "tokenizer_config.json"), None)
    (tmp_path / "t.jinja").write_text(HF_CHAT_TEMPLATE)
    from_file = resolve_chat_template(str(tmp_path / "t.jinja"), None)
    expected = "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    for template in (default, explicit, from_file):
        assert template.render(CHAT[1:], True, bos_token="<s>") == expected
    assert resolve_chat_template(None, None) is None


def test_named_templates_in_config(tmp_path: Path) -> None:
    config = tmp_path / "tokenizer_config.json"
    config.write_text(
        json.dumps(
            {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]}
        )
    )
    assert resolve_chat_template(str(config), None).source == "y"
    config.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ChatTemplateError, match="has no chat_template"):
        resolve_chat_template(str(config), None)


def test_unknown_and_broken_templates(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="unknown chat template 'nope'"):
        resolve_chat_template("nope", None)
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match=r"broken\.jinja"):
        resolve_chat_template(str(tmp_path / "broken.jinja"), None)


def test_template_whose_prompt_is_not_a_prefix_is_an_error(tmp_path: Path) -> None:
    # the generation prompt differs from how an assistant turn starts
    (tmp_path / "odd.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[bot] {% endif %}"
    )
    template = resolve_chat_template(str(tmp_path / "odd.jinja"), None)
    with pytest.raises(ChatTemplateError, match="is not a prefix of the prompt \\+ response rendering"):
        template.split(CHAT, REPLY)


def test_train_tokenizer_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [json.loads(line) for line in hh_lines(150)]
    records += [
        {
            "prompt": [{"role": "user", "content": "Zebra quagga?"}],
            "responses": ["Xylophone", "Yak"],
            "scores": [1, 0],
        },
        {"prompt": "Plain", "chosen": "yes", "rejected": "no", "margin": 1.5},
    ]
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert (
        main(
            [
                "train-tokenizer",
                "--input",
                str(source),
                "--output",
                str(tmp_path / "tok"),
                "--vocab-size",
                "500",
            ]
        )
        == 0
    )
    assert "tok.model" in capsys.readouterr().out
    tokenizer = load_tokenizer(tmp_path / "tok.model")
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (500, 1, 2, 3)
    for record in records[:5]:
        assert tokenizer.decode(tokenizer.encode(record["chosen"])) == record["chosen"]
    assert tokenizer.decode(tokenizer.encode("Zebra quagga?")) == "Zebra quagga?"


def test_train_tokenizer_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text(
        '{"prompt": "Q", "chosen": "a", "rejected": "b"}\n{"prompt": "Q", "chosen": 1, "rejected": "b"}\n'
    )
    assert (
        main(
            [
                "train-tokenizer",
                "--input",
                str(source),
                "--output",
                str(tmp_path / "tok"),
                "--vocab-size",
                "300",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{source}:2: field 'chosen'" in err and "Traceback" not in err


CORRUPT_CONFIGS = [
    (b'{"eos_token": "</s>",\n  "bos_token": }', r":2: invalid JSON: Expecting value at column 16"),
    (b'["eos_token", "</s>"]', ": expected a JSON object, got list"),
    (b'{"eos_token": "\xff"}', ": not UTF-8 text"),
    (
        b'{"eos_token": 2}',
        ": field 'eos_token': expected a string or an object with a string 'content', got 2",
    ),
    (b'{"bos_token": {"content": 1}}', ": field 'bos_token': expected a string or an object"),
    (b'{"pad_token": ["<pad>"]}', ": field 'pad_token': expected a string or an object"),
    (b'{"add_bos_token": "no"}', ": field 'add_bos_token': expected true or false, got 'no'"),
    (b'{"add_bos_token": 1}', ": field 'add_bos_token': expected true or false, got 1"),
    (b'{"chat_template": 5}', ": field 'chat_template': must be a string"),
    (
        b'{"chat_template": [{"name": "tool_use", "template": "x"}]}',
        ": field 'chat_template': a list without",
    ),
]


@pytest.mark.parametrize(("content", "reason"), CORRUPT_CONFIGS)
def test_corrupt_tokenizer_config_names_the_file(
    hf_dir: Path, tmp_path: Path, content: bytes, reason: str
) -> None:
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    config = tmp_path / "tokenizer_config.json"
    config.write_bytes(content)
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)
    assert str(info.value).startswith(f"{config.resolve()}{reason}")
    with pytest.raises(ChatTemplateError) as info:
        resolve_chat_template(str(config), None)
    assert str(info.value).startswith(f"{config}{reason}")


def test_corrupt_tokenizer_config_stops_preprocess_with_exit_2(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "</s>"')
    source = tmp_path / "in.jsonl"
    source.write_text(hh_lines(1)[0] + "\n")
    args = ["--input", str(source), "--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "ds")]
    assert main(["preprocess", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'tok' / 'tokenizer_config.json'}:1: invalid JSON" in err and "Traceback" not in err


def test_non_utf8_jinja_template_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "t.jinja").write_bytes(b"{{ messages }}\xff")
    with pytest.raises(
        ChatTemplateError, match=r"t\.jinja: not a UTF-8 text file \(invalid start byte at byte 14\)"
    ):
        resolve_chat_template(str(tmp_path / "t.jinja"), None)


def test_train_tokenizer_truncated_gzip_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gzip

    source = tmp_path / "hh.jsonl.gz"
    source.write_bytes(gzip.compress(("\n".join(hh_lines(200)) + "\n").encode())[:-4])
    args = [
        "train-tokenizer",
        "--input",
        str(source),
        "--output",
        str(tmp_path / "tok"),
        "--vocab-size",
        "300",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{source}:201: cannot read past line 200: the compressed stream ends early" in err
    assert "Traceback" not in err
