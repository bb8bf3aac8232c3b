"""Loading a local Hugging Face tokenizer, its EOS ids, chat template and prompt encoding.

Everything here runs in the caller's process (server / offline engine front end), never in the
engine core, so tokenizing a long prompt does not stall the GPU loop.

A note on SentencePiece tokenizers (Llama 2, Mistral): words carry their leading space inside the
token as "▁" ("▁Hello"), and the decoder drops the "▁" of the *first* token of whatever list it is
given. ``decode([▁Hello])`` is therefore "Hello" but ``decode([x, ▁Hello])`` ends in " Hello", and
a lone "▁" token at the start decodes to "". Decoding generated tokens one at a time loses every
word boundary; :class:`radixlm.tokenizer.detokenizer.IncrementalDetokenizer` decodes a window that
starts a few tokens back (optionally inside the prompt) and keeps only the difference. The same rule
explains why the first generated token after a prompt decodes with its space only when prompt
context is given. Byte-level BPE tokenizers (Llama 3, GPT-2 family) spell the space as "Ġ" and have
no first-token rule, but may split one UTF-8 character across tokens, as may SentencePiece's byte
fallback (<0xF0><0x9F>...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Any one of these makes a directory loadable by AutoTokenizer without a hub.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


class TokenizerError(ValueError):
    """A tokenizer directory or chat template problem, with the path or cause in the message."""


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored in a local directory (never from a model hub).

    Args:
        path: a Hugging Face model or tokenizer directory.

    Returns:
        The tokenizer (fast/tokenizers backend when the directory has tokenizer.json).

    Raises:
        TokenizerError: the directory is missing or holds no tokenizer files.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {str(directory)!r} does not exist")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"{str(directory)!r} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); "
            "point the tokenizer option at a directory that has them"
        )
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot load the tokenizer in {str(directory)!r}: {exc}") from exc


def eos_token_ids(
    tokenizer: PreTrainedTokenizerBase, model_dir: str | Path | None = None
) -> set[int]:
    """Every token id that ends generation.

    Chat models often stop on more than the tokenizer's EOS: Llama 3 Instruct ends a turn with
    ``<|eot_id|>`` while the base EOS is ``<|end_of_text|>``; the full list lives in the model's
    generation_config.json (and sometimes config.json).

    Args:
        tokenizer: the request tokenizer.
        model_dir: the model directory whose generation_config.json / config.json to read.

    Returns:
        The union of ``tokenizer.eos_token_id`` and the ``eos_token_id`` of those files.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model_dir is not None:
        for name in ("generation_config.json", "config.json"):
            ids |= _eos_ids_in_json(Path(model_dir) / name)
    return ids


def _eos_ids_in_json(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {int(v) for v in value if isinstance(v, int)}
    return set()


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
) -> str:
    """Render chat messages to the prompt text the model was trained on.

    The template comes from chat_template.jinja (transformers >= 4.43 saves it there and
    transformers 5 loads it with the tokenizer) or from tokenizer_config.json.

    Args:
        tokenizer: a tokenizer loaded with :func:`load_tokenizer`.
        messages: ``[{"role": "user", "content": "..."}, ...]``.
        add_generation_prompt: append the header that opens the assistant's turn.

    Returns:
        The prompt text; it usually starts with the BOS token text, so encode it with
        :func:`encode`, which does not add a second BOS.

    Raises:
        TokenizerError: the tokenizer has no chat template, or the template fails on messages.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template (none of "
            f"{', '.join(CHAT_TEMPLATE_FILES)} defines one); send a plain prompt instead"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja raises its own types, e.g. TemplateError from raise_exception
        raise TokenizerError(f"chat template failed: {exc}") from exc


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt, with the special tokens the tokenizer adds by default (BOS).

    Text rendered by a chat template already starts with the BOS text; encoding it the default
    way would yield two BOS ids, so the duplicate is dropped.

    Args:
        tokenizer: the request tokenizer.
        text: prompt text.

    Returns:
        The token ids.
    """
    ids = tokenizer.encode(text)
    bos_id, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    doubled = len(ids) >= 2 and ids[0] == ids[1] == bos_id
    if bos_id is not None and bos_text and doubled and text.startswith(bos_text):
        return ids[1:]
    return ids
