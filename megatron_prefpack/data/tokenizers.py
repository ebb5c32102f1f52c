"""Tokenizers from local files: SentencePiece ``.model`` and Hugging Face ``tokenizer.json``.

:func:`load_tokenizer` is the only constructor other modules need. ``encode`` never adds
special tokens; the preprocessor adds BOS (when the tokenizer has one) and EOS itself so the
prompt and the responses can be tokenized separately.

Special tokens of a ``tokenizer.json`` come from a ``tokenizer_config.json`` beside it
(``bos_token``, ``eos_token``, ``pad_token``, ``add_bos_token``, ``chat_template``); without
one, EOS/BOS/PAD are looked up among a few conventional names and the choice is recorded
in :meth:`Tokenizer.describe`. A tokenizer without an EOS token is refused. ``pad_id`` falls
back to ``eos_id`` when no pad token exists (pad tokens never carry loss or attention).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from megatron_prefpack.data.json_files import read_json_object

_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class TokenizerError(Exception):
    """A tokenizer file that cannot be used (missing, unreadable, no EOS token, a corrupt
    ``tokenizer_config.json``). The message starts with the file at fault."""


class Tokenizer(ABC):
    """Text <-> token ids. ``bos_id`` is ``None`` when the tokenizer adds no BOS token.

    ``bos_token``/``eos_token`` are the special tokens' texts (given to chat templates;
    ``bos_token`` may be set while ``bos_id`` is ``None``: the tokenizer has one but adds none);
    ``chat_template`` is the Jinja template found beside the tokenizer, if any.
    """

    kind: str
    """``"sentencepiece"`` or ``"huggingface"``."""
    path: Path
    eos_id: int
    bos_id: int | None
    pad_id: int
    vocab_size: int
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special tokens added."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def describe(self) -> dict[str, Any]:
        """What identifies this tokenizer, saved beside every dataset made with it."""
        return {
            "type": self.kind,
            "path": str(self.path),
            "sha256": _sha256(self.path),
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``. Its own pad/bos/eos ids are used (unset bos -> ``None``)."""

    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        import sentencepiece

        self.path = path
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
        self.vocab_size = self._sp.GetPieceSize()
        if self._sp.eos_id() < 0:
            raise TokenizerError(
                f"{path}: the SentencePiece model defines no EOS id (train it with eos_id >= 0)"
            )
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.eos_token = self._sp.IdToPiece(self.eos_id)
        self.bos_token = None if self.bos_id is None else self._sp.IdToPiece(self.bos_id)

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), with its config if present."""

    kind = "huggingface"

    def __init__(self, path: Path) -> None:
        import tokenizers

        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for bad files
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_path = path.with_name("tokenizer_config.json")
        self.config_path = config_path if config_path.exists() else None
        config = {} if self.config_path is None else read_tokenizer_config(config_path)
        self.eos_token = self._special(config, "eos_token", _EOS_NAMES)
        if self.eos_token is None:
            raise TokenizerError(
                f"{path}: cannot tell the EOS token; put a tokenizer_config.json with 'eos_token' beside it"
            )
        self.eos_id = self._id(self.eos_token)
        # A template may still render bos_token when add_bos_token is false: keep its text.
        self.bos_token = self._special(config, "bos_token", _BOS_NAMES)
        adds_bos = (
            self.bos_token is not None and config.get("add_bos_token") is not False
        )  # absent or null: true
        self.bos_id = self._id(self.bos_token) if adds_bos else None
        pad_token = self._special(config, "pad_token", _PAD_NAMES)
        self.pad_id = self.eos_id if pad_token is None else self._id(pad_token)
        self.chat_template = template_from_config(config, config_path)

    def _special(self, config: dict, key: str, conventional: tuple[str, ...]) -> str | None:
        if key in config:  # null: the tokenizer has none
            value = config[key]
            return value["content"] if isinstance(value, dict) else value
        return next((name for name in conventional if self._tok.token_to_id(name) is not None), None)

    def _id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.path}: special token {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> dict[str, Any]:
        description = super().describe()
        description["config"] = None if self.config_path is None else str(self.config_path)
        return description


def read_tokenizer_config(path: Path) -> dict[str, Any]:
    """A parsed ``tokenizer_config.json`` whose keys this module reads have usable types: special
    tokens (``bos_token``, ``eos_token``, ``pad_token``) strings or ``{"content": str}`` objects
    or null, ``add_bos_token`` a boolean or null, a valid ``chat_template``. Raises
    :class:`TokenizerError` naming the file (and line, for invalid JSON)."""
    config = read_json_object(path, TokenizerError)
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(content, str):
            raise TokenizerError(
                f"{path}: field '{key}': expected a string or an object with a string 'content', got {value!r}"
            )
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise TokenizerError(f"{path}: field 'add_bos_token': expected true or false, got {add_bos!r}")
    template_from_config(config, path)
    return config


def template_from_config(config: dict, config_path: Path) -> str | None:
    """The ``chat_template`` of a parsed tokenizer_config.json (the ``default`` one when named)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise TokenizerError(f"{config_path}: field 'chat_template': a list without a 'default' entry")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_path}: field 'chat_template': must be a string")
    return template


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a local file: a SentencePiece ``.model``, a ``tokenizer.json``, or a
    directory holding ``tokenizer.json`` or ``tokenizer.model``."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise TokenizerError(f"{path}: directory has neither tokenizer.json nor tokenizer.model")
    if not path.exists():
        raise TokenizerError(f"{path}: no such tokenizer file")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise TokenizerError(
        f"{path}: unknown tokenizer file type (expected a SentencePiece .model or tokenizer.json)"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
