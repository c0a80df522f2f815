"""Build a tiny random Llama-architecture model and tokenizer offline, saved like any hub checkpoint.

    python -m finetune.tiny_model OUT_DIR [--tokenizer char|bpe] [--hidden 64] [--layers 2] [--seed 0]

`char`: a byte-level tokenizer with no merges (one token per character): tasks over characters stay learnable for
a tiny model, and prompt/response boundaries never merge. `bpe`: a byte-level BPE with merges learnt from a small
built-in English text, so tests see real multi-character tokens and boundary effects. Both have Llama's special
tokens <unk>=0, <s>=1, </s>=2 and no pad token, like Llama-2.
"""

from __future__ import annotations

import argparse
import os

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BPE_CORPUS = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. ### Instruction: ### Input: ### Response: "
    "A chat. USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> system human gpt "
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital. "
    "Hello! How are you today? I am fine, thank you. Please reverse the string abc. cba. "
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 answer question reply explain think because therefore "
)


def build_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab_size = len(alphabet) + len(SPECIAL_TOKENS) + (0 if kind == "char" else 500)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator([BPE_CORPUS] * 20 if kind == "bpe" else ["a"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_model(vocab_size: int, hidden: int, layers: int, seed: int, init_std: float = 0.02):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    return LlamaForCausalLM(config)


def make_tiny_model(
    out_dir: str, tokenizer_kind: str = "bpe", hidden: int = 64, layers: int = 2, seed: int = 0, init_std: float = 0.02
) -> str:
    """init_std: a frozen random output head with the usual 0.02 caps logits near uniform behind the final norm, so
    adapters alone cannot learn; the demo uses a larger one."""
    tokenizer = build_tokenizer(tokenizer_kind)
    model = build_model(len(tokenizer), hidden, layers, seed, init_std)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", choices=["char", "bpe"], default="bpe", help="tokenizer kind (see above)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed (default 0)")
    parser.add_argument("--init_std", type=float, default=0.02, help="weight init std (default 0.02)")
    args = parser.parse_args()
    make_tiny_model(args.out_dir, args.tokenizer, args.hidden, args.layers, args.seed, args.init_std)


if __name__ == "__main__":
    main()
