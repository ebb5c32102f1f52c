"""Chat templates: render chat-message records to text and split off each response.

A template is Jinja source rendered like Hugging Face ``apply_chat_template`` does
(sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``) with
``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``. It comes from

* a built-in name (:data:`BUILTIN_TEMPLATES`):

  - ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; the generation
    prompt is ``<|im_start|>assistant\\n``;
  - ``hh``: the HH-RLHF text format, ``\\n\\nHuman: {content}`` for user and
    ``\\n\\nAssistant: {content}`` for assistant messages (other roles are refused); the
    generation prompt is ``\\n\\nAssistant:``, so a response renders as ``" {content}"``,
    exactly as the implicit-prompt split of HH-RLHF text pairs gives it;

* a ``tokenizer_config.json`` (its ``chat_template``), or a Jinja file;
* by default, the ``chat_template`` of the tokenizer_config.json beside ``tokenizer.json``.

Response text = render(prompt + [response]) minus render(prompt, add_generation_prompt=True);
a template for which the latter is not a prefix of the former cannot be split and is an error.
The preprocessor tokenizes the whole rendering as one text (as TRL does with
``apply_chat_template``), so the split only says where the prompt ends.

The built-in templates start with ``{{ bos_token }}``: the preprocessor gives them the BOS the
tokenizer puts before plain text (none when it adds none), so that a chat record tokenizes
like the same conversation written as a text record. Other templates get the tokenizer's
``bos_token`` whether or not it is added to plain text, as ``apply_chat_template`` does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{{ bos_token }}{% for message in messages %}"
        "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # newlines go through string literals: trim_blocks would eat one after a block tag
    "hh": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message.role == 'user' %}{{ '\\n\\nHuman: ' + message.content }}"
        "{% elif message.role == 'assistant' %}{{ '\\n\\nAssistant: ' + message.content }}"
        "{% else %}{{ raise_exception('the hh template has only user and assistant turns, got ' + message.role) }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
    ),
}


class ChatTemplateError(ValueError):
    """A template that cannot be loaded, rendered, or split into prompt and response."""


@dataclass
class ChatTemplate:
    """Compiled Jinja chat template. ``name`` says where it came from (built-in name or path);
    ``builtin``: one of :data:`BUILTIN_TEMPLATES` (see the module docstring for its BOS)."""

    name: str
    source: str
    builtin: bool = False
    _compiled: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        try:
            self._compiled = env.from_string(self.source)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template {self.name}: {e}") from None

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> str:
        from jinja2 import TemplateError

        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token or "",
                eos_token=eos_token or "",
            )
        except TemplateError as e:
            raise ChatTemplateError(f"chat template {self.name}: {e}") from None

    def split(
        self,
        prompt: list[dict[str, Any]],
        response: dict[str, Any],
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> tuple[str, str]:
        """``(prompt_text, response_text)`` for one prompt and one assistant response."""
        prompt_text = self.render(prompt, True, bos_token, eos_token)
        full_text = self.render([*prompt, response], False, bos_token, eos_token)
        if not full_text.startswith(prompt_text):
            raise ChatTemplateError(
                f"chat template {self.name}: the prompt rendered with add_generation_prompt=True "
                f"({_tail(prompt_text)}) is not a prefix of the prompt + response rendering "
                f"({_tail(full_text[: len(prompt_text)])}), so the response tokens cannot be separated"
            )
        return prompt_text, full_text[len(prompt_text) :]

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "sha256": hashlib.sha256(self.source.encode()).hexdigest()}


def resolve_chat_template(name_or_path: str | None, tokenizer_template: str | None) -> ChatTemplate | None:
    """The template for ``--chat-template``: a built-in name, a tokenizer_config.json, a Jinja
    file, or (``None``) the tokenizer's own ``tokenizer_template``; ``None`` if there is none."""
    if name_or_path is None:
        return (
            None if tokenizer_template is None else ChatTemplate("tokenizer_config.json", tokenizer_template)
        )
    if name_or_path in BUILTIN_TEMPLATES:
        return ChatTemplate(name_or_path, BUILTIN_TEMPLATES[name_or_path], builtin=True)
    path = Path(name_or_path)
    if not path.is_file():
        raise ChatTemplateError(
            f"unknown chat template {name_or_path!r}: use a built-in ({', '.join(BUILTIN_TEMPLATES)}), "
            "a tokenizer_config.json or a Jinja file"
        )
    if path.suffix == ".json":
        from megatron_prefpack.data.tokenizers import (
            TokenizerError,
            read_tokenizer_config,
            template_from_config,
        )

        try:
            source = template_from_config(read_tokenizer_config(path), path)
        except TokenizerError as e:
            raise ChatTemplateError(str(e)) from None
        if source is None:
            raise ChatTemplateError(f"{path}: has no chat_template")
        return ChatTemplate(str(path), source)
    try:
        return ChatTemplate(str(path), path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ChatTemplateError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tail(text: str, n: int = 40) -> str:
    return repr(text[-n:]) if len(text) <= n else "..." + repr(text[-n:])
