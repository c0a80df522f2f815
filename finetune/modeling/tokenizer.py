"""The tokenizer as training uses it: special-token overrides, the llama-1 patch, the tokens a format's layout
needs, the chat template that reproduces the training layout, a pad token, right padding."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

import transformers

from dataset_formats import FORMAT_INFO
from finetune.data.pipeline import attach_chat_template
from finetune.errors import UsageError

if TYPE_CHECKING:
    from train import DataArguments, ModelArguments

logger = logging.getLogger(__name__)

# the files a llama-1 directory should have had; shipped at the top of the repository, next to train.py
LLAMA1_PATCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "llama-1-patch")


def read_template(value: str) -> str:
    """--chat_template_jinja: a file's path, or the template text (anything with a Jinja tag is taken as text)."""
    if "{%" in value or "{{" in value:
        return value
    if not os.path.isfile(value):
        raise UsageError(f"--chat_template_jinja {value}: neither a file nor a Jinja template (no {{% or {{{{ in it)")
    with open(value, encoding="utf-8") as handle:
        return handle.read()


def load_tokenizer(model_args: ModelArguments, data_args: DataArguments):
    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load a tokenizer from {source} ({str(error).splitlines()[0]}); "
                         "pass --tokenizer_name_or_path or add the tokenizer files to the model directory") from error
    if model_args.llama1_patch:
        apply_llama1_patch(tokenizer)
    overrides = {
        name: value
        for name, value in (
            ("bos_token", model_args.bos_token),
            ("eos_token", model_args.eos_token),
            ("unk_token", model_args.unk_token),
            ("pad_token", model_args.pad_token),
        )
        if value is not None
    }
    if overrides:
        added = tokenizer.add_special_tokens(overrides)
        logger.info("special tokens set: %s (%d new to the vocabulary)", overrides, added)
    if model_args.add_tokens:
        new = [token for token in dict.fromkeys(model_args.add_tokens) if token not in tokenizer.get_vocab()]
        tokenizer.add_tokens(new)
        logger.info("--add_tokens: %d of %d new to the vocabulary: %s", len(new), len(model_args.add_tokens), new)
    formats = data_args.dataset_format
    needed = {t for name in formats for t in FORMAT_INFO[name].special_tokens}
    layout_tokens = sorted(t for t in needed if t not in tokenizer.get_vocab())
    if layout_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": layout_tokens}, replace_extra_special_tokens=False)
        logger.info("--dataset_format %s needs %s: added to the vocabulary", " ".join(formats), layout_tokens)
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no EOS token, so models could never learn to stop; pass --eos_token")
    if model_args.chat_template_jinja:
        tokenizer.chat_template = read_template(model_args.chat_template_jinja)
        logger.info("chat template from --chat_template_jinja replaces the tokenizer's own")
    if "chat_template" in formats and not tokenizer.chat_template:
        raise UsageError("--dataset_format chat_template renders with the tokenizer's own chat template, and this "
                         "tokenizer has none; pick a layout format (chatml, llama2_chat, vicuna, sharegpt)")
    attach_chat_template(tokenizer, formats)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        logger.info("no pad token: padding with %r (masks and labels come from lengths)", tokenizer.pad_token)
    tokenizer.padding_side = "right"
    return tokenizer


def apply_llama1_patch(tokenizer) -> None:
    """The special tokens and BOS/EOS behaviour of llama-1-patch/ (the files a llama-1 directory should have had)."""
    with open(os.path.join(LLAMA1_PATCH_DIR, "special_tokens_map.json")) as handle:
        special = json.load(handle)
    with open(os.path.join(LLAMA1_PATCH_DIR, "tokenizer_config.json")) as handle:
        config = json.load(handle)
    missing = [token for token in special.values() if token not in tokenizer.get_vocab()]
    if missing:
        raise UsageError(f"--llama1_patch: the tokenizer has no {missing}; it is not a llama-1 tokenizer")
    tokenizer.add_special_tokens(special)
    for name in ("add_bos_token", "add_eos_token"):
        if hasattr(tokenizer, name):
            setattr(tokenizer, name, config[name])
    logger.info("--llama1_patch: special tokens set to %s", special)

