"""Tokenizers from local files: SentencePiece ``.model`` and Hugging Face ``tokenizer.json``.

:func:`load_tokenizer` is the only constructor other modules need. ``encode`` never adds
special tokens; the preprocessor puts ``bos_id`` in front of each text itself and ends each
response with EOS (see ``preprocess``), and encodes chat-template renderings with
``encode_rendered``.

``bos_id`` is the BOS that the tokenizer puts in front of a text when special tokens are added
(``None``: none), decided as transformers' ``AutoTokenizer`` decides it for a ``tokenizer.json``
(``TokenizersBackend``, transformers 5): the ``tokenizer.json`` post-processor alone decides
(``TemplateProcessing``, ``RobertaProcessing``, ...). The single token it puts before a text is
the BOS; none, or no post-processor at all, means no BOS, even when the config names a
``bos_token``. ``add_bos_token``/``add_eos_token`` in ``tokenizer_config.json`` are ignored
beside a ``tokenizer.json``, as ``from_pretrained`` ignores them. A post-processor that puts
more than one token before a text, or anything but EOS after it, is refused (no causal-LM
tokenizer does; it would be approximated otherwise).

A SentencePiece ``.model`` adds its own BOS when it defines one (as the sentencepiece-based
Llama tokenizers of transformers do by default, ``add_bos_token=True``).

Special tokens of a ``tokenizer.json`` come from a ``tokenizer_config.json`` beside it
(``bos_token``, ``eos_token``, ``pad_token``, ``chat_template``) and are made special added
tokens, as transformers does, so that their text in a chat rendering encodes to their id;
without a config, EOS/BOS/PAD are looked up among a few conventional names and the choice is
recorded in :meth:`Tokenizer.describe`. A tokenizer without an EOS token is refused. ``pad_id``
falls back to ``eos_id`` when no pad token exists (pad tokens never carry loss or attention).
"""

from __future__ import annotations

import hashlib
import re
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

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a chat-template rendering, as transformers' ``apply_chat_template``
        tokenizes it: no special tokens added, and the texts of the BOS and EOS tokens in it
        are those tokens."""
        return self.encode(text)

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

    def encode_rendered(self, text: str) -> list[int]:
        # SentencePiece encodes control-symbol texts as plain characters: split them out first.
        specials = {t: i for t, i in ((self.bos_token, self.bos_id), (self.eos_token, self.eos_id)) if t}
        if not any(t in text for t in specials):
            return self.encode(text)
        ids: list[int] = []
        for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            ids += [specials[part]] if part in specials else self.encode(part)
        return ids

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
        # A template may render bos_token even when none is added: keep its text.
        self.bos_token = self._special(config, "bos_token", _BOS_NAMES)
        pad_token = self._special(config, "pad_token", _PAD_NAMES)
        self.pad_id = self.eos_id if pad_token is None else self._id(pad_token)
        special = [
            t
            for t in (self.bos_token, self.eos_token, pad_token)
            if t and self._tok.token_to_id(t) is not None
        ]
        self._tok.add_special_tokens(
            [tokenizers.AddedToken(t, special=True, normalized=False) for t in special]
        )
        self.bos_id = self._post_processor_bos()
        self.chat_template = template_from_config(config, config_path)

    def _post_processor_bos(self) -> int | None:
        """The one token the tokenizer.json post-processor puts before a text (``None``: none)."""
        probe = "Hello world"
        plain = self._tok.encode(probe, add_special_tokens=False).ids
        full = self._tok.encode(probe, add_special_tokens=True).ids
        start = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), None)
        if not plain or start is None:
            raise TokenizerError(f"{self.path}: cannot tell which special tokens its post-processor adds")
        before, after = full[:start], full[start + len(plain) :]
        if len(before) > 1 or after not in ([], [self.eos_id]):
            raise TokenizerError(
                f"{self.path}: field 'post_processor': adds {before} before and {after} after a text; "
                "only one BOS before and EOS after are supported"
            )
        return before[0] if before else None

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
    or null, ``add_bos_token``/``add_eos_token`` booleans or null, a valid ``chat_template``. Raises
    :class:`TokenizerError` naming the file (and line, for invalid JSON)."""
    config = read_json_object(path, TokenizerError)
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(content, str):
            raise TokenizerError(
                f"{path}: field '{key}': expected a string or an object with a string 'content', got {value!r}"
            )
    for key in ("add_bos_token", "add_eos_token"):
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            raise TokenizerError(f"{path}: field '{key}': expected true or false, got {value!r}")
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
