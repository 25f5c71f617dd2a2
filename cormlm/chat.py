"""Chat prompts rendered with the checkpoint's own template (tokenizer_config.json's
``chat_template`` or chat_template.jinja), as transformers does: a sandboxed Jinja
environment (jinja2 ships with torch), ``add_generation_prompt`` on."""

from __future__ import annotations

from .checkpoint.tokenizer import Tokenizer
from .errors import InputError


class TemplateError(InputError):
    """The checkpoint's chat template cannot render these messages."""


def _raise(message: str) -> None:
    raise TemplateError(f"the chat template refused the conversation: {message}")


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text for ``messages`` (role/content dicts), ending where the reply starts."""
    if not tokenizer.chat_template:
        raise InputError("this checkpoint defines no chat template (tokenizer_config.json chat_template); "
                         "drop --chat to complete the raw prompt")
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise

    def token(token_id: int | None) -> str:
        return "" if token_id is None else tokenizer.decode([token_id], skip_special_tokens=False)

    try:
        return env.from_string(tokenizer.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=token(tokenizer.bos_token_id),
            eos_token=token(tokenizer.eos_token_id))
    except JinjaError as exc:
        raise TemplateError(f"the checkpoint's chat template failed to render: {exc}") from exc
