"""Architectures of the models the scripts/ recipes train, as published in their config.json files, with their
published parameter counts: config-only model directories let a dry run plan a 70B run on a laptop, offline."""

from __future__ import annotations

import os
import shutil

LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
REAL_CONFIGS = {
    # hub id: (config fields, published parameter count)
    "meta-llama/Llama-2-7b-hf": (dict(LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32), 6_738_415_616),
    "meta-llama/Llama-2-13b-hf": (dict(LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                       num_attention_heads=40, num_key_value_heads=40), 13_015_864_320),
    "meta-llama/Llama-2-70b-hf": (dict(LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                       num_attention_heads=64, num_key_value_heads=8), 68_976_648_192),
    "mistralai/Mistral-7B-v0.1": (dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       max_position_embeddings=32768, sliding_window=4096, rope_theta=10000.0,
                                       tie_word_embeddings=False), 7_241_732_096),
    "meta-llama/Meta-Llama-3-8B": (dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                                        tie_word_embeddings=False), 8_030_261_248),
    "Qwen/Qwen2.5-7B": (dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                             max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
                             tie_word_embeddings=False), 7_615_616_512),
}


def config_only_model(hub_id: str, directory: str, tokenizer_dir: str) -> str:
    """A model directory with the real config.json and a small tokenizer (no weights)."""
    from transformers import AutoConfig

    fields, _ = REAL_CONFIGS[hub_id]
    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(tokenizer_dir, name), directory)
    return directory
