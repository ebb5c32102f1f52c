"""Token ids of preprocessed groups against transformers' own tokenizer, as TRL uses it.

The reference is written from TRL's ``DPOTrainer`` preprocessing, not from this package: a text
record is ``tokenizer(prompt + response + eos_token)`` (``AutoTokenizer`` from the directory,
special tokens as its config says), a chat record is ``apply_chat_template(prompt + [response])``.
A group must reproduce each such sequence exactly as ``prompt + response_k``, and its prompt must
be the longest common token prefix of ``tokenizer(prompt)`` (or the rendered prompt with the
generation prompt) and all full sequences. Cases: a prompt ending in a space, no-BOS and BOS
tokenizers (tokenizer.json post-processor or ``add_bos_token``), ``add_eos_token``, unicode, a
response that is a token-level prefix of another, chat templates with and without an EOS
that closes the assistant turn.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_prefpack.data.chat_templates import resolve_chat_template
from megatron_prefpack.data.preprocess import tokenize_record
from megatron_prefpack.data.records import InvalidRecord, parse_record
from megatron_prefpack.data.tokenizers import TokenizerError, load_tokenizer
from tests.fixtures.tokenizer_files import HF_CHAT_TEMPLATE

transformers = pytest.importorskip("transformers")

TEXT_RECORDS = [
    {
        "prompt": "\n\nHuman: What colour is the sky?\n\nAssistant: ",
        "chosen": "Blue is a color.",
        "rejected": "Red.",
    },
    {"prompt": "Human: Name one.\n\nAssistant:", "chosen": " Blue", "rejected": " Blue sky"},
    {
        "prompt": "Traduis: café",
        "responses": [" naïve ☕ 日本語", "s crème brûlée", "\u00e9"],
        "scores": [1, 2, 3],
    },
    {"prompt": "Say it", "chosen": " twice</s>", "rejected": " once"},
]
USER = {"role": "user", "content": "Café? 日本"}
CHAT_RECORDS = [
    {"prompt": [USER], "chosen": "Blue is a color.", "rejected": "Blue"},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, USER],
        "responses": ["Oui ☕", "Oui ☕ merci", " "],
        "scores": [0, 1, 2],
    },
]


def make_tokenizer(source: Path, target: Path, config: dict, post_processor: str | None) -> Path:
    """A copy of the fixture's tokenizer.json with ``post_processor`` (``"bos"``: ``<s> $A``,
    ``None``: none) and ``config`` as tokenizer_config.json."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    if post_processor == "bos":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    target.mkdir()
    tokenizer.save(str(target / "tokenizer.json"))
    (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return target


BASE = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": HF_CHAT_TEMPLATE}
VARIANTS = {
    # name: (tokenizer_config.json, tokenizer.json post-processor, BOS transformers adds)
    "bos-named-not-added": (BASE, None, False),
    "post-processor-bos": (BASE, "bos", True),
    # beside a tokenizer.json, from_pretrained ignores add_bos_token/add_eos_token
    "add_bos_token-true-ignored": ({**BASE, "add_bos_token": True}, None, False),
    "add_bos_token-false-ignored": ({**BASE, "add_bos_token": False, "add_eos_token": True}, "bos", True),
    "im_end-is-eos": ({**BASE, "eos_token": "<|im_end|>"}, None, False),
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest, hf_dir: Path, tmp_path: Path):
    config, post_processor, adds_bos = VARIANTS[request.param]
    directory = make_tokenizer(hf_dir, tmp_path / "tok", config, post_processor)
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    return load_tokenizer(directory), reference, adds_bos


def record(obj: dict):
    return parse_record(json.dumps(obj).encode(), "test.jsonl", 1)


def common_prefix(sequences: list[list[int]]) -> list[int]:
    n = 0
    while all(len(s) > n and s[n] == sequences[0][n] for s in sequences):
        n += 1
    return sequences[0][:n]


def trl_text(reference, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """TRL's non-conversational tokenization: (prompt ids, prompt + completion ids)."""
    eos = reference.eos_token
    completion = response if response.endswith(eos) else response + eos
    return reference(prompt)["input_ids"], reference(prompt + completion)["input_ids"]


def trl_chat(reference, prompt: list, response: dict) -> tuple[list[int], list[int]]:
    """TRL's conversational tokenization: (prompt ids with generation prompt, full ids)."""
    prompt_ids = reference.apply_chat_template(
        prompt, tokenize=True, add_generation_prompt=True, return_dict=True
    )
    full = reference.apply_chat_template([*prompt, response], tokenize=True, return_dict=True)
    return prompt_ids["input_ids"], full["input_ids"]


def assert_group_matches(group, prompt_ids: list[int], full: list[list[int]]) -> None:
    assert group.prompt.tolist() == common_prefix([prompt_ids, *full])
    assert len(group.prompt) >= 1 and all(len(r) >= 1 for r in group.responses)
    assert [group.prompt.tolist() + r.tolist() for r in group.responses] == full


def test_bos_is_the_one_transformers_adds(variant) -> None:
    tokenizer, reference, adds_bos = variant
    assert (reference("Hi")["input_ids"][:1] == [reference.bos_token_id]) == adds_bos
    assert tokenizer.bos_id == (reference.bos_token_id if adds_bos else None)
    assert tokenizer.eos_id == reference.eos_token_id


def test_text_records_equal_trl_tokenization(variant) -> None:
    tokenizer, reference, _ = variant
    for obj in TEXT_RECORDS:
        rec = record(obj)
        group = tokenize_record(rec, tokenizer, None)
        pairs = [trl_text(reference, rec.prompt, r) for r in rec.responses]
        assert_group_matches(group, pairs[0][0], [f for _, f in pairs])


def test_trailing_space_goes_with_the_response(hf_dir: Path) -> None:
    """The issue's example: ``':' | 'ĠB'``, not ``':' 'Ġ' | 'B'``."""
    reference = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    group = tokenize_record(record(TEXT_RECORDS[0]), load_tokenizer(hf_dir), None)
    assert reference.convert_ids_to_tokens(group.prompt.tolist()[-1:]) == [":"]
    first = reference.convert_ids_to_tokens(group.responses[0].tolist()[:1])[0]
    assert first.startswith("Ġ") and len(first) > 1
    assert reference.decode(group.prompt.tolist() + group.responses[0].tolist()) == (
        TEXT_RECORDS[0]["prompt"] + TEXT_RECORDS[0]["chosen"] + "</s>"
    )


def test_response_that_is_a_token_prefix_of_another_keeps_its_tokens(hf_dir: Path) -> None:
    tokenizer = load_tokenizer(hf_dir)
    group = tokenize_record(record(TEXT_RECORDS[1]), tokenizer, None)
    short, long = (r.tolist() for r in group.responses)
    assert short[:-1] == long[: len(short) - 1] and short[-1] == tokenizer.eos_id
    assert tokenizer.decode(short) == " Blue</s>" and tokenizer.decode(long) == " Blue sky</s>"


def test_chat_records_equal_apply_chat_template(variant) -> None:
    tokenizer, reference, _ = variant
    template = resolve_chat_template(None, tokenizer.chat_template)
    for obj in CHAT_RECORDS:
        rec = record(obj)
        group = tokenize_record(rec, tokenizer, template)
        pairs = [trl_chat(reference, list(rec.prompt), r) for r in rec.responses]
        # TRL adds no EOS to conversational data; EOS is appended here only when the template
        # closes the turn without one (the fixture's template ends turns with <|im_end|>).
        eos = reference.eos_token_id
        full = [f if eos in f[len(p) - 1 :] else [*f, eos] for p, f in pairs]
        assert_group_matches(group, pairs[0][0], full)


def test_builtin_template_starts_like_a_text_record(hf_dir: Path, tmp_path: Path) -> None:
    """``chatml``/``hh`` get a BOS exactly when plain text does."""
    text = {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Bye"}
    chat = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "Bye"}
    with_bos = make_tokenizer(hf_dir, tmp_path / "bos", BASE, "bos")
    for directory in (hf_dir, with_bos):
        tokenizer = load_tokenizer(directory)
        a = tokenize_record(record(text), tokenizer, None)
        b = tokenize_record(record(chat), tokenizer, resolve_chat_template("hh", None))
        assert a.prompt.tolist() == b.prompt.tolist()
        assert [r.tolist() for r in a.responses] == [r.tolist() for r in b.responses]
        assert (a.prompt[0] == tokenizer.bos_id) == (directory == with_bos)


def test_no_prompt_token_left_is_invalid(hf_dir: Path) -> None:
    tokenizer = load_tokenizer(hf_dir)
    assert tokenizer.bos_id is None
    word = next(w for w in (" the", "the", " you") if len(tokenizer.encode(w)) == 1)
    bad = {"prompt": word[:1], "chosen": word[1:], "rejected": word[1:] + "!"}
    with pytest.raises(InvalidRecord, match="field 'prompt': its first token merges") as error:
        tokenize_record(record(bad), tokenizer, None)
    assert error.value.category == "no_prompt_boundary"


def test_post_processor_with_other_tokens_is_refused(hf_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, processors

    directory = tmp_path / "bert"
    shutil.copytree(hf_dir, directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    pad = tokenizer.token_to_id("<pad>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A <pad>", special_tokens=[("<s>", 1), ("<pad>", pad)]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    with pytest.raises(
        TokenizerError, match=r"tokenizer\.json: field 'post_processor': adds \[1\] before and"
    ):
        load_tokenizer(directory)
