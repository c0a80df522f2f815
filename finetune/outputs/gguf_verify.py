"""Checks of written GGUF files against the model they came from (gguf_export.py writes the results into
export_verification.json): tensors read back with gguf's reader, the tokenizer rebuilt from the file, and the
file loaded as a model by transformers' GGUF loader (an implementation independent of the writer's)."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from finetune.modeling.checkpoint_files import MergeError

logger = logging.getLogger(__name__)

# the bound of a round trip, per 32-value block, as a fraction of the block's largest |value| (gguf's formats:
# q8_0 = f16 scale amax/127 + int8 codes; q4_0 = scale amax/-8 + 4-bit codes, the opposite extreme clipped to 7)
# (the scale's own f16 rounding adds up to 2^-11 relative, or for a subnormal scale 2^-25 absolute per code step)
BLOCK_BOUNDS = {"q8_0": 1 / 254 + 2 ** -11, "q4_0": 1 / 8 + 2 ** -10}
SUBNORMAL_SLACK = {"q8_0": 127 * 2 ** -25, "q4_0": 8 * 2 ** -25}
GREEDY_TOKENS = 32
VERIFY_PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time,", "1, 2, 3, 4,"]
REQUIRED_KEYS = ("general.architecture", "general.file_type", "{arch}.context_length", "{arch}.embedding_length",
                 "{arch}.block_count", "{arch}.attention.head_count", "{arch}.attention.layer_norm_rms_epsilon",
                 "{arch}.rope.freq_base", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.eos_token_id")


def verify_files(directory: str, layout, tokenizer, model_dir: str, sample_texts: list[str], types: list[str],
                 prompt_ids: list[int] | None = None) -> dict:
    report = {}
    reference = None
    for name in sorted(f for f in os.listdir(directory) if f.endswith(".gguf")):
        path = os.path.join(directory, name)
        entry = {"tensors": check_tensors(path, layout), "metadata": check_metadata(path, layout, tokenizer)}
        entry["tokenizer"] = check_tokenizer(directory, name, tokenizer, sample_texts[:64] + VERIFY_PROMPTS)
        if reference is None:
            import transformers

            reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        entry["logits"] = check_logits(directory, name, reference, tokenizer, VERIFY_PROMPTS)
        try:  # reported, never fatal: the files are written and checked above
            entry["llama_cpp"] = check_llama_cpp(path, reference, tokenizer, VERIFY_PROMPTS, prompt_ids)
        except Exception as error:  # llama.cpp raises RuntimeError, ValueError, ... from its C side
            entry["llama_cpp"] = {"skipped": f"llama.cpp failed on the file: {type(error).__name__}: {error}"}
        report[name] = entry
        logger.info("GGUF %s verified: %d tensors (worst %s), tokenizer ids equal on %d/%d texts, next-token argmax "
                    "agrees on %d/%d prompts (max |logit diff| %.3g)", name, entry["tensors"]["checked"],
                    entry["tensors"]["worst"], entry["tokenizer"]["equal"], entry["tokenizer"]["texts"],
                    entry["logits"]["top1_agree"], entry["logits"]["prompts"], entry["logits"]["max_abs_diff"])
        native = entry["llama_cpp"]
        if "skipped" in native:
            logger.info("GGUF %s: no llama.cpp check: %s", name, native["skipped"])
        else:
            logger.info("GGUF %s in llama.cpp: next-token argmax agrees on %d/%d prompts (max |logit diff| %.3g), "
                        "tokenizer equal on %d, end tokens treated as end of generation: %s", name,
                        native["top1_agree"], native["prompts"], native["max_abs_diff"], native["tokenizer_equal"],
                        native["end_of_generation"])
    return report


def check_tensors(path: str, layout) -> dict:
    """Every tensor equals the model's (f32 exactly, f16 / bf16 equal to the cast) or is within its quantization
    bound per 32-value block; a failure raises."""
    import gguf

    reader = gguf.GGUFReader(path)
    stored = {tensor.name: tensor for tensor in reader.tensors}
    if len(stored) != len(layout.names):
        raise MergeError(f"GGUF verification: {path} holds {len(stored)} tensors, the model {len(layout.names)}")
    qt = gguf.GGMLQuantizationType
    worst: dict[str, float] = {}
    for name, target, tensors in layout.names:
        tensor = stored[target]
        expected = layout.tensor(name, tensors)
        if list(tensor.shape) != list(reversed(expected.shape)):
            raise MergeError(f"GGUF verification: {target} has shape {list(tensor.shape)} (GGUF order), expected "
                             f"{list(reversed(expected.shape))}")
        decoded = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        kind = tensor.tensor_type
        if kind in (qt.F32, qt.F16, qt.BF16):
            cast = {qt.F32: torch.float32, qt.F16: torch.float16, qt.BF16: torch.bfloat16}[kind]
            want = torch.from_numpy(np.ascontiguousarray(expected)).to(cast).float().numpy()
            error = float(np.abs(decoded - want).max(initial=0))
            if error:
                raise MergeError(f"GGUF verification: {target} ({kind.name}) differs from the model's weights cast to "
                                 f"{kind.name} by {error:.3g}")
            worst[kind.name] = 0.0
            continue
        blocks = expected.reshape(-1, 32)
        scale = np.abs(blocks).max(axis=1, keepdims=True)
        error = np.abs(decoded.reshape(-1, 32) - blocks)
        if kind.name.lower() not in BLOCK_BOUNDS:  # llama.cpp's K-quant mixes and their fallbacks: measured
            relative = float(np.sqrt((error ** 2).mean()) / max(float(np.sqrt((blocks ** 2).mean())), 1e-30))
            if not np.isfinite(decoded).all() or relative > 0.5:
                raise MergeError(f"GGUF verification: {target} ({kind.name}) has a relative RMS error of {relative:.3g}")
            worst[kind.name] = max(worst.get(kind.name, 0.0), round(relative, 6))
            continue
        bound, slack = BLOCK_BOUNDS[kind.name.lower()], SUBNORMAL_SLACK[kind.name.lower()]
        if (error > bound * scale + slack).any():
            block = int((error - bound * scale - slack).max(axis=1).argmax())
            raise MergeError(f"GGUF verification: {target} ({kind.name}) is off by {error[block].max():.3g} in a block "
                             f"whose largest value is {scale[block, 0]:.3g}; {kind.name} guarantees "
                             f"{bound:.4f} x that + {slack:.2g}")
        relative = float((error / np.maximum(scale, 1e-30)).max(initial=0))
        worst[kind.name] = max(worst.get(kind.name, 0.0), round(relative, 6))
    return {"checked": len(stored), "worst": worst,  # per type: worst block error / block max (K-quants: RMS ratio)
            "bounds": {k: BLOCK_BOUNDS.get(k.lower(), 0.0) for k in worst}}


def check_metadata(path: str, layout, tokenizer) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    keys = [key.format(arch=layout.arch) for key in REQUIRED_KEYS]
    missing = [key for key in keys if reader.get_field(key) is None]
    if missing:
        raise MergeError(f"GGUF verification: {path} lacks {', '.join(missing)}")
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    if len(tokens) != layout.config.vocab_size:
        raise MergeError(f"GGUF verification: {len(tokens)} tokens but {layout.config.vocab_size} embedding rows")
    values = {key: reader.get_field(key).contents() for key in
              ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
               "tokenizer.ggml.eot_token_id", "tokenizer.ggml.padding_token_id", f"{layout.arch}.context_length",
               f"{layout.arch}.rope.freq_base", f"{layout.arch}.rope.scaling.type", f"{layout.arch}.rope.scaling.factor")
              if reader.get_field(key) is not None}
    if values.get("tokenizer.ggml.eos_token_id") != tokenizer.eos_token_id:
        raise MergeError(f"GGUF verification: eos id {values.get('tokenizer.ggml.eos_token_id')} in the file, "
                         f"{tokenizer.eos_token_id} in the tokenizer")
    template = reader.get_field("tokenizer.chat_template")
    values["chat_template"] = template is not None and template.contents() == tokenizer.chat_template
    if tokenizer.chat_template and not values["chat_template"]:
        raise MergeError("GGUF verification: the chat template is missing or differs from the tokenizer's")
    return values


def check_tokenizer(directory: str, name: str, tokenizer, texts: list[str]) -> dict:
    """The tokenizer transformers rebuilds from the file's vocabulary gives the HF tokenizer's ids."""
    import transformers

    rebuilt = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    differ = [text for text in texts if rebuilt(text, add_special_tokens=False)["input_ids"]
              != tokenizer(text, add_special_tokens=False)["input_ids"]]
    if differ:
        raise MergeError(f"GGUF verification: the file's tokenizer splits {len(differ)} of {len(texts)} texts "
                         f"differently, e.g. {differ[0][:80]!r}")
    return {"texts": len(texts), "equal": len(texts) - len(differ)}


def check_logits(directory: str, name: str, reference, tokenizer, prompts: list[str]) -> dict:
    """Next-token logits of the file loaded by transformers' GGUF loader vs the model itself (reported; a
    quantized file is expected to differ a little)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    agree, worst = 0, 0.0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            want, got = reference(input_ids=ids).logits[0, -1], model(input_ids=ids).logits[0, -1]
            agree += int(want.argmax() == got.argmax())
            worst = max(worst, float((want - got).abs().max()))
    return {"prompts": len(prompts), "top1_agree": agree, "max_abs_diff": round(worst, 6)}


def check_llama_cpp(path: str, reference, tokenizer, prompts: list[str], prompt_ids: list[int] | None = None) -> dict:
    """llama.cpp itself (llama-cpp-python, requirements-llamacpp.txt; `make test` installs it): the file's next-token
    logits vs the model's, its own tokenization vs the HF ids, which of our end tokens it treats as end of generation,
    and a greedy generation from `prompt_ids` (the first training sample's prompt, in the training format) that ends
    at the first one it meets, beside the model's own greedy answer. Reported, not enforced (a quantized file
    differs)."""
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install -r requirements-llamacpp.txt)"}
    start = list(prompt_ids or tokenizer(prompts[0])["input_ids"])
    longest = max([len(start)] + [len(tokenizer(prompt)["input_ids"]) for prompt in prompts])
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(256, longest + GREEDY_TOKENS + 8), verbose=False,
                          n_threads=max(1, min(4, os.cpu_count() or 1)))
    try:
        agree, worst, same_ids = 0, 0.0, 0
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            with torch.no_grad():
                want = reference(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
            llm.reset()
            llm.eval(ids)
            got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
            agree += int(got.argmax() == want.argmax())
            worst = max(worst, float(np.abs(got - want).max()))
            plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            same_ids += int(llm.tokenize(prompt.encode(), add_bos=False, special=True) == plain)
        vocab = llm._model.vocab
        ends = end_tokens(tokenizer, path)
        eog = {token: bool(llama_cpp.llama_vocab_is_eog(vocab, token)) for token in ends}
        generated, stopped = [], False
        for token in llm.generate(start, temp=0.0, repeat_penalty=1.0, reset=True):
            generated.append(int(token))
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                stopped = True
                break
            if len(generated) >= GREEDY_TOKENS:
                break
    finally:
        llm.close()
    import transformers

    plain_greedy = transformers.GenerationConfig(  # not the model's own settings (a repetition penalty would differ)
        do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=ends,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    with torch.no_grad():
        output = reference.generate(torch.tensor([start]), attention_mask=torch.ones(1, len(start), dtype=torch.long),
                                    generation_config=plain_greedy)
    expected = output[0, len(start):].tolist()
    return {"prompts": len(prompts), "top1_agree": agree, "max_abs_diff": round(worst, 6), "tokenizer_equal": same_ids,
            "end_of_generation": {str(token): value for token, value in eog.items()},
            "greedy_prompt": "training sample" if prompt_ids else "plain text", "greedy_tokens": len(generated),
            "greedy_stopped_at_end_token": stopped, "greedy_equals_model": generated == expected,
            "greedy_text": tokenizer.decode(generated)}


def end_tokens(tokenizer, path: str) -> list[int]:
    """EOS and the file's end-of-turn token."""
    import gguf

    reader = gguf.GGUFReader(path)
    eot = reader.get_field("tokenizer.ggml.eot_token_id")
    return sorted({tokenizer.eos_token_id} | ({int(eot.contents())} if eot is not None else set()))
