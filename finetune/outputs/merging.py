"""Merge a LoRA adapter into its base model one tensor at a time, so a merge never holds the whole model in memory.

Why a module of its own: merging is a separate job from training with its own rules (it reads files, not modules),
and two callers share it: the merge at the end of a training run and `train.py --merge_only` (see `--help`).

How (`merge_adapter`): the base checkpoint's shards are read tensor by tensor with plain file reads (safetensors'
`safe_open` maps the whole shard, and every page it touches counts towards the process's memory until the shard is
closed). Each LoRA target gets `W + scale * B @ A` computed in fp32 (DoRA: each output row then rescaled to its
trained magnitude, as peft merges it); modules_to_save (embeddings and output head
trained in full, e.g. after new tokens resized the vocabulary) replace their base tensors; everything is cast to the
requested dtype and streamed into output shards named and laid out like the base's, then the index, config.json
(dtype, vocab_size, tying), tokenizer (with its chat template) and generation config. Peak memory is a few copies of
the largest tensor, not the model. All of it goes to a temporary sibling directory renamed into place at the end, so
a failure leaves no partial merge (and an older merge stays untouched).

`merge_base`: a QLoRA adapter was trained against the 4-bit weights, not the 16-bit ones. `original` merges into the
16-bit base (what the qlora scripts do); `nf4_roundtrip` first quantizes and dequantizes exactly the layers that were
4-bit in training, with the run's settings (recorded next to the adapter in base_quantization.json by
`BaseLoading.save`), so the merged model computes what base+adapter computed in training.

After the merge, `verify_merge` (optional) compares the merged model with base+adapter loaded the way training
loaded them, on a few samples: max/mean |logit difference|, argmax agreement and perplexities, in the log and in
merge_verification.json. It loads both models in full, so it is not bounded like the merge itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from finetune.config.precision import bitsandbytes_config
from finetune.fileio import free_bytes, nearest_existing_dir
from finetune.modeling.checkpoint_files import (
    SAFETENSORS_NAMES,
    MergeError,
    TensorFile,
    base_checkpoint_files,
)

logger = logging.getLogger(__name__)

MERGE_BASES = ("original", "nf4_roundtrip")
QUANTIZATION_RECORD = "base_quantization.json"
VERIFICATION_FILE = "merge_verification.json"
VERIFY_MAX_TOKENS = 512  # each verification sample is cut to this many tokens
PEFT_PREFIX = "base_model.model."
# LoRA config fields whose non-default values change what merging means; none of them is used by train.py
UNSUPPORTED_LORA_OPTIONS = {
    "lora_bias": "LoRA bias", "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters", "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA", "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA",
}
# The fallback verification text, for a merge with no training samples at hand (--merge_only without --dataset).
VERIFICATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital of France.",
    "Hello! How are you today? I am fine, thank you. Please reverse the string abc: the answer is cba.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12: count them, then explain your answer because it matters.",
)


@dataclass
class BaseLoading:
    """How training loaded the base model the adapter was trained against. Saved next to the adapter, so a later
    merge (--merge_base nf4_roundtrip) and the verification can rebuild exactly those weights."""

    bits: int  # 4, 8 (bitsandbytes), 16 or 32
    dtype: str  # dtype the base was loaded in; for 4 bits also the compute dtype (quantization starts from it)
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64  # bitsandbytes' default, which transformers' BitsAndBytesConfig uses
    quant_storage: str = "uint8"

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, QUANTIZATION_RECORD), "w") as handle:
            json.dump(asdict(self), handle, indent=2)

    @classmethod
    def load(cls, directory: str) -> Optional[BaseLoading]:
        path = os.path.join(directory, QUANTIZATION_RECORD)
        if not os.path.isfile(path):
            return None
        with open(path) as handle:
            return cls(**json.load(handle))

    def describe(self) -> str:
        if self.bits == 4:
            return (f"4-bit {self.quant_type} (double quant {self.double_quant}, blocksize {self.blocksize}, "
                    f"from {self.dtype})")
        return "8-bit LLM.int8" if self.bits == 8 else self.dtype


# --- reading and writing checkpoints one tensor at a time ---------------------------------------------------------------


def write_safetensors(path: str, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor]) -> int:
    """Write a safetensors file whose tensors are produced one at a time: the header (names, dtypes, shapes and
    offsets) is known up front, so each tensor's bytes go to disk as soon as it exists. Returns the data size."""
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        for name, dtype, shape in tensors:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise MergeError(f"internal: {name} came out {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return offset


def resolve_base(base: str) -> str:
    """A local directory as is; a hub id through the local cache (offline works when training downloaded it)."""
    if os.path.isdir(base):
        return base
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.py", "*.model", "*.txt"])
        if not any(name.endswith(".safetensors") for name in os.listdir(path)):  # an old .bin-only checkpoint
            path = snapshot_download(base, allow_patterns=["*.json", "*.bin", "*.py", "*.model", "*.txt"])
        return path
    except Exception as error:  # huggingface_hub raises many types (offline, not found, gated)
        raise MergeError(f"base model {base}: not a local directory and not fetchable ({error}); "
                         "pass the base model's local directory") from error


# --- the adapter --------------------------------------------------------------------------------------------------------


@dataclass
class LoraPair:
    a_key: str
    b_key: str
    scale: float
    transpose: bool  # fan_in_fan_out layers (Conv1D) and embeddings store the delta transposed
    magnitude_key: Optional[str] = None  # DoRA: the trained norm of each output row


@dataclass
class Adapter:
    file: TensorFile
    config: dict
    lora: dict[str, LoraPair] = field(default_factory=dict)  # base tensor name -> its LoRA pair
    module_replacements: dict[str, str] = field(default_factory=dict)  # modules_to_save: base tensor -> adapter key
    param_replacements: dict[str, str] = field(default_factory=dict)  # plain tensors (e.g. resized embeddings)

    def replacement(self, name: str) -> Optional[str]:
        return self.module_replacements.get(name) or self.param_replacements.get(name)


def read_adapter(adapter_dir: str) -> Adapter:
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise MergeError(f"{adapter_dir} has no adapter_config.json: pass the directory a LoRA run saved its adapter "
                         "to (its --output_dir) or one of its checkpoint-N directories")
    with open(config_path) as handle:
        config = json.load(handle)
    check_lora_config(config, adapter_dir)
    weights = [os.path.join(adapter_dir, name) for name in ("adapter_model.safetensors", "adapter_model.bin")]
    weights = [path for path in weights if os.path.isfile(path)]
    if not weights:
        raise MergeError(f"{adapter_dir} has no adapter_model.safetensors; the adapter was not saved completely")
    adapter = Adapter(TensorFile(weights[0]), config)
    pairs: dict[str, dict[str, str]] = {}
    for key in adapter.file.names:
        name = key.removeprefix(PEFT_PREFIX)
        linear = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        magnitude = re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.weight)?", name)
        embedding = re.fullmatch(r"(.+)\.lora_embedding_([AB])", name)
        kept = re.fullmatch(r"(.+)\.modules_to_save\.(.+)", name)
        if magnitude:
            pairs.setdefault(magnitude.group(1), {"embedding": False})["magnitude"] = key
        elif linear or embedding:
            module, side = (linear or embedding).groups()
            pairs.setdefault(module, {"embedding": bool(embedding)})[side] = key
        elif kept:
            adapter.module_replacements[f"{kept.group(1)}.{kept.group(2)}"] = key
        elif re.fullmatch(r".+\.original_module\..+", name):
            continue  # peft's copy of the untrained module
        elif "lora_" in name:
            raise MergeError(f"{adapter_dir}: adapter tensor {key} belongs to a LoRA variant this merge does not know")
        elif is_kept_module(name.rpartition(".")[0], config.get("modules_to_save") or []):
            adapter.module_replacements.setdefault(name, key)  # peft also saves the trained copy under the plain name
        else:
            adapter.param_replacements[name] = key  # e.g. embeddings resized without modules_to_save
    from peft.utils.other import get_pattern_key

    for module, sides in pairs.items():
        if "A" not in sides or "B" not in sides:
            raise MergeError(f"{adapter_dir}: {module} has only one of lora_A / lora_B; the adapter is damaged")
        a_shape = adapter.file.shape(sides["A"])
        if len(a_shape) != 2:
            raise MergeError(f"{adapter_dir}: {module} is a LoRA on a {len(a_shape)}-D weight (convolution); "
                             "only linear and embedding layers can be merged")
        rank = a_shape[0]
        expected = config.get("rank_pattern", {}).get(get_pattern_key(config.get("rank_pattern", {}), module), config["r"])
        if rank != expected:
            raise MergeError(f"{adapter_dir}: {module} has rank {rank} but its config says {expected}")
        alpha = config.get("alpha_pattern", {}).get(get_pattern_key(config.get("alpha_pattern", {}), module),
                                                   config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transpose = sides["embedding"] or bool(config.get("fan_in_fan_out"))
        if "magnitude" in sides and (sides["embedding"] or not config.get("use_dora")):
            raise MergeError(f"{adapter_dir}: {module} has a DoRA magnitude vector on "
                             f"{'an embedding' if sides['embedding'] else 'an adapter without use_dora'}; "
                             "only DoRA on linear layers can be merged")
        if config.get("use_dora") and "magnitude" not in sides:
            raise MergeError(f"{adapter_dir}: use_dora is set but {module} has no lora_magnitude_vector; the "
                             "adapter is damaged")
        adapter.lora[f"{module}.weight"] = LoraPair(sides["A"], sides["B"], scale, transpose, sides.get("magnitude"))
    return adapter


def is_kept_module(module: str, modules_to_save: list[str]) -> bool:
    """peft's own rule: a module is wrapped (trained in full) when its name ends with a modules_to_save entry."""
    return any(module == kept or module.endswith("." + kept) for kept in modules_to_save)


def check_lora_config(config: dict, adapter_dir: str) -> None:
    if config.get("peft_type") != "LORA":
        raise MergeError(f"{adapter_dir} holds a {config.get('peft_type')} adapter; only LoRA adapters can be merged")
    for option, what in UNSUPPORTED_LORA_OPTIONS.items():
        if config.get(option):
            raise MergeError(f"{adapter_dir}: the adapter uses {what} ({option}), which this merge does not support")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise MergeError(f"{adapter_dir}: init_lora_weights={init!r} also changed the base weights during training, "
                         "so this adapter only fits the changed base. Merge the run's final adapter (--output_dir: "
                         "saved as a plain LoRA on the original base), or convert this one with peft "
                         "(save_pretrained(path_initial_model_for_weight_conversion=<working_dir>/initial_adapter))")


# --- the plan: what goes where, checked before anything is written ------------------------------------------------------


@dataclass
class PlannedTensor:
    name: str  # in the merged checkpoint
    source: TensorFile  # base file holding source_name
    source_name: Optional[str]
    replacement: Optional[str]  # adapter key whose tensor stands in for the base tensor
    lora: Optional[LoraPair]
    roundtrip: Optional[str]  # "linear" or "conv1d": quantize -> dequantize first (nf4_roundtrip)
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class MergePlan:
    shards: list[tuple[str, list[PlannedTensor]]]  # merged file name, its tensors in order
    vocab_size: Optional[int]
    untie: bool
    indexed: bool

    def total_bytes(self) -> int:
        return sum(math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()
                   for _, tensors in self.shards for t in tensors)


def skeleton_model(config, trust_remote_code: bool):
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def quantized_weights(skeleton, loading: BaseLoading) -> dict[str, str]:
    """The weights training stored in 4 bits: transformers' own choice (every Linear/Conv1D but the output head,
    tied weights and _keep_in_fp32_modules), made on an empty model -> {weight name: "linear" | "conv1d"}."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer

    originals = {name: module for name, module in skeleton.named_modules()}
    config = bitsandbytes_config(4, getattr(torch, loading.dtype), loading.quant_type, loading.double_quant,
                                 loading.quant_storage)
    skip = HfQuantizer.get_modules_to_not_convert(skeleton, None, skeleton._keep_in_fp32_modules)
    replace_with_bnb_linear(skeleton, modules_to_not_convert=skip, quantization_config=config)
    return {f"{name}.weight": "conv1d" if isinstance(originals[name], Conv1D) else "linear"
            for name, module in skeleton.named_modules() if type(module).__name__ == "Linear4bit"}


def plan_merge(base_dir: str, adapter: Adapter, dtype: torch.dtype, roundtrip: dict[str, str], tied: dict[str, str],
               embeddings: set[str]) -> MergePlan:
    """Every output tensor with its recipe; every adapter tensor must land somewhere, or nothing is written."""
    files = base_checkpoint_files(base_dir)
    readers = [(TensorFile(path), merged_name) for path, merged_name in files]
    location = {name: reader for reader, _ in readers for name in reader.names}
    untie = tie_must_break(adapter, tied)
    if not untie:  # still tied: a plain (resized) copy saved under the head's name is the shared tensor's value
        for target, source in tied.items():
            if target in adapter.param_replacements and source not in adapter.param_replacements:
                adapter.param_replacements[source] = adapter.param_replacements[target]
    shards = []
    for reader, merged_name in readers:
        planned = []
        for name in reader.names:
            planned.append(plan_tensor(name, reader, name, adapter, dtype, roundtrip))
            for target, source in tied.items() if untie else ():
                if source == name and target not in location:  # the head was stored as the embedding: write it
                    planned.append(plan_tensor(target, reader, name, adapter, dtype, roundtrip))
        shards.append((merged_name, planned))
    planned_names = {t.name for _, tensors in shards for t in tensors}
    unused = [n for n in [*adapter.lora, *adapter.module_replacements, *adapter.param_replacements]
              if n not in planned_names and not (n in tied and not untie)]
    if unused:
        raise MergeError(f"the adapter changes {', '.join(sorted(unused)[:5])}, which the base checkpoint in "
                         f"{base_dir} does not have; is it the base the adapter was trained on?")
    vocab = {t.shape[0] for _, tensors in shards for t in tensors if t.name in embeddings}
    if len(vocab) > 1:
        raise MergeError(f"the merged embeddings and output head would have different vocabulary sizes {sorted(vocab)}; "
                         "an adapter that resized them must carry both (modules_to_save embed_tokens and lm_head)")
    return MergePlan(shards, vocab.pop() if vocab else None, untie, len(files) > 1 or files[0][1] != "model.safetensors")


def embedding_weights(skeleton) -> set[str]:
    """Names of the input embedding and output head weights (their first dimension is the vocabulary)."""
    wanted = [skeleton.get_input_embeddings(), skeleton.get_output_embeddings()]
    return {f"{name}.weight" for name, module in skeleton.named_modules() if any(module is w for w in wanted if w is not None)}


def plan_tensor(name: str, reader: TensorFile, source_name: str, adapter: Adapter, dtype: torch.dtype,
                roundtrip: dict[str, str]) -> PlannedTensor:
    replacement = adapter.replacement(name)
    if replacement is None and name != source_name:  # an untied head starts from the shared tensor's value
        replacement = adapter.param_replacements.get(source_name)
    lora = adapter.lora.get(name)
    if replacement and lora:
        raise MergeError(f"the adapter both replaces {name} (modules_to_save) and has a LoRA on it; cannot merge both")
    shape = adapter.file.shape(replacement) if replacement else reader.shape(source_name)
    source_dtype = adapter.file.dtype(replacement) if replacement else reader.dtype(source_name)
    if lora:
        rows = adapter.file.shape(lora.b_key)[0]
        cols = adapter.file.shape(lora.a_key)[1]
        if (tuple(shape) if not lora.transpose else tuple(shape)[::-1]) != (rows, cols):
            raise MergeError(f"LoRA on {name} makes a {rows}x{cols} update but the base weight is {tuple(shape)}")
    if replacement and not lora and name in reader.entries:
        old = reader.shape(name)
        if len(old) != len(shape) or tuple(old[1:]) != tuple(shape[1:]):
            raise MergeError(f"the adapter's {name} has shape {tuple(shape)}, the base's {tuple(old)}")
    out_dtype = dtype if source_dtype.is_floating_point else source_dtype
    return PlannedTensor(name, reader, source_name, replacement, lora,
                         roundtrip.get(source_name) if not replacement else None, out_dtype, tuple(shape))


def tie_must_break(adapter: Adapter, tied: dict[str, str]) -> bool:
    """Tied weights (output head = input embedding) stay tied unless the adapter changes one side alone: a LoRA or a
    modules_to_save copy on one of them (peft keeps the other on the shared original), or two different copies."""
    for target, source in tied.items():
        own = [n for n in (target, source) if n in adapter.lora or n in adapter.module_replacements]
        if not own:
            continue
        same_copies = (not any(n in adapter.lora for n in own) and len(own) == 2
                       and torch.equal(adapter.file.read(adapter.module_replacements[target]),
                                       adapter.file.read(adapter.module_replacements[source])))
        if not same_copies:
            return True
    return False


def materialize(tensor: PlannedTensor, adapter: Adapter, loading: Optional[BaseLoading]) -> torch.Tensor:
    value = adapter.file.read(tensor.replacement) if tensor.replacement else tensor.source.read(tensor.source_name)
    if tensor.roundtrip:
        value = quantize_roundtrip(value, loading, transpose=tensor.roundtrip == "conv1d")
    if tensor.lora:
        delta = adapter.file.read(tensor.lora.b_key).float() @ adapter.file.read(tensor.lora.a_key).float()
        value = value.float()
        value += (delta.T if tensor.lora.transpose else delta) * tensor.lora.scale
        del delta
        if tensor.lora.magnitude_key:  # DoRA: each output row rescaled to its trained norm (peft's merge)
            rows = 0 if tensor.lora.transpose else 1  # Conv1D stores [in, out]: an output row is a column
            norm = torch.linalg.norm(value, dim=rows, keepdim=True)
            magnitude = adapter.file.read(tensor.lora.magnitude_key).float()
            value *= magnitude.view(norm.shape) / norm
    return value.to(tensor.dtype) if value.is_floating_point() else value


def quantize_roundtrip(weight: torch.Tensor, loading: BaseLoading, transpose: bool = False) -> torch.Tensor:
    """The weight a 4-bit run computed with: cast to the dtype training loaded the base in, quantized with the run's
    settings, dequantized (bitsandbytes, the same calls Params4bit makes; they run on CPU too)."""
    import bitsandbytes.functional as bnb_functional

    value = weight.to(getattr(torch, loading.dtype))
    if transpose:
        value = value.T.contiguous()
    packed, state = bnb_functional.quantize_4bit(value, blocksize=loading.blocksize,
                                                 compress_statistics=loading.double_quant, quant_type=loading.quant_type,
                                                 quant_storage=getattr(torch, loading.quant_storage))
    restored = bnb_functional.dequantize_4bit(packed, state)
    return restored.T if transpose else restored


# --- the entry point ----------------------------------------------------------------------------------------------------


def merge_adapter(base: str, adapter_dir: str, output_dir: str, dtype: torch.dtype, merge_base: str = "original",
                  trained_against: Optional[BaseLoading] = None, tokenizer=None, generation_config=None,
                  verify_samples: int = 0, samples: Optional[list[dict]] = None,
                  trust_remote_code: bool = False, base_config=None) -> dict:
    """Base + LoRA adapter -> one plain model in output_dir (see the module docstring). `trained_against` is used
    when the adapter directory has no base_quantization.json (an adapter from elsewhere). `samples` are tokenized
    rows (input_ids, labels) for the verification; None means the built-in text. Returns the verification report
    (empty when verify_samples is 0). `base_config` replaces the base's config.json (e.g. with RoPE scaling, as the
    run loaded it); the merged model and the verification's reference both use it."""
    import copy

    import transformers

    if merge_base not in MERGE_BASES:
        raise MergeError(f"merge base {merge_base!r}: pick one of {', '.join(MERGE_BASES)}")
    if sys.byteorder != "little":
        raise MergeError("this merge writes little-endian safetensors and needs a little-endian machine")
    base_dir = resolve_base(base)
    config = (copy.deepcopy(base_config) if base_config is not None
              else transformers.AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code))
    if getattr(config, "quantization_config", None):
        raise MergeError(f"{base} is a pre-quantized checkpoint; merge into the 16-bit model it was made from")
    adapter = read_adapter(adapter_dir)
    recorded = BaseLoading.load(adapter_dir)
    loading = recorded or trained_against
    if recorded is None and trained_against is not None:
        logger.info("no %s in %s: assuming the base was loaded as %s (the --bits/--quant_type/--double_quant/--bf16 "
                    "flags)", QUANTIZATION_RECORD, adapter_dir, trained_against.describe())
    target = output_dir.rstrip(os.sep)
    for kept in (base_dir, adapter_dir):
        if os.path.commonpath([os.path.realpath(target), os.path.realpath(kept)]) == os.path.realpath(target):
            raise MergeError(f"--merged_output_dir {target} would replace {kept}, which the merge reads; pick another "
                             "directory")
    skeleton = skeleton_model(config, trust_remote_code)
    embeddings = embedding_weights(skeleton)
    tied = dict(skeleton.all_tied_weights_keys) if getattr(config.get_text_config(), "tie_word_embeddings", False) else {}
    roundtrip: dict[str, str] = {}
    if merge_base == "nf4_roundtrip":
        if loading is None or loading.bits != 4:
            raise MergeError(f"--merge_base nf4_roundtrip rebuilds the 4-bit weights a --bits 4 run trained against, "
                             f"but this adapter was trained on a {loading.describe() if loading else 'unknown'} base; "
                             "use --merge_base original")
        roundtrip = quantized_weights(skeleton, loading)
    plan = plan_merge(base_dir, adapter, dtype, roundtrip, tied, embeddings)
    dtype_name = str(dtype).replace("torch.", "")
    if merge_base == "nf4_roundtrip":
        why = (f"{len(roundtrip)} weights re-quantized as {loading.describe()}, as in training; --merge_base original "
               "would use the 16-bit ones")
    elif loading is not None and loading.bits == 4:
        why = "16-bit weights; --merge_base nf4_roundtrip would use the 4-bit weights the adapter trained against"
    else:
        why = "the base's weights"
    logger.info("merging %d LoRA layers%s into %s as %s (merge base %s: %s) -> %s", len(adapter.lora),
                f" and {len(adapter.module_replacements)} full tensors" if adapter.module_replacements else "",
                base, dtype_name, merge_base, why, output_dir)
    check_free_space(target, plan.total_bytes())
    staging = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        write_merged(plan, adapter, loading, staging)
        config.get_text_config().vocab_size = plan.vocab_size or config.get_text_config().vocab_size
        if plan.untie:
            config.tie_word_embeddings = config.get_text_config().tie_word_embeddings = False
            logger.info("the adapter changes the output head and the input embedding differently: saved untied")
        config.dtype = dtype
        config.use_cache = True
        config.save_pretrained(staging)
        save_companions(base_dir, adapter_dir, staging, tokenizer, generation_config)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("merged model (%s, %.1f MiB) saved to %s", dtype_name, plan.total_bytes() / 2**20, target)
    if verify_samples <= 0:
        return {}
    return verify_merge(target, base_dir, adapter_dir, loading, merge_base, verify_samples, samples, trust_remote_code,
                        base_config)


def write_merged(plan: MergePlan, adapter: Adapter, loading: Optional[BaseLoading], staging: str) -> None:
    weight_map = {}
    for merged_name, tensors in plan.shards:
        by_name = {t.name: t for t in tensors}
        write_safetensors(os.path.join(staging, merged_name), [(t.name, t.dtype, t.shape) for t in tensors],
                          lambda name, by_name=by_name: materialize(by_name[name], adapter, loading))
        weight_map.update({t.name: merged_name for t in tensors})
    if plan.indexed:
        with open(os.path.join(staging, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {"total_size": plan.total_bytes()}, "weight_map": dict(sorted(weight_map.items()))},
                      handle, indent=2)


def save_companions(base_dir: str, adapter_dir: str, staging: str, tokenizer, generation_config) -> None:
    """Tokenizer (the adapter's, which carries added tokens and the chat template), generation config, and any
    custom model code shipped with the base."""
    import transformers

    if tokenizer is None:
        source = adapter_dir if os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")) else base_dir
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(staging)
    if generation_config is not None:
        generation_config.save_pretrained(staging)
    else:
        for directory in (adapter_dir, base_dir):
            if os.path.isfile(os.path.join(directory, "generation_config.json")):
                shutil.copy(os.path.join(directory, "generation_config.json"), staging)
                break
    for name in os.listdir(base_dir):
        if name.endswith(".py"):
            shutil.copy(os.path.join(base_dir, name), staging)


def check_free_space(target: str, needed: int) -> None:
    existing = nearest_existing_dir(target)
    free = free_bytes(existing)
    if free < needed * 1.05:
        raise MergeError(f"the merged model needs {needed / 2**30:.2f} GiB and {existing} has {free / 2**30:.2f} GiB "
                         "free; free space or point --merged_output_dir at a larger disk")


def replace_directory(staging: str, target: str) -> None:
    """Renames only: an older merge is moved aside, the new one moved in, then the old one deleted."""
    old = f"{target}.old-{os.getpid()}"
    if os.path.exists(target):
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


# --- verification -------------------------------------------------------------------------------------------------------


def verification_rows(merged_dir: str, count: int, samples: Optional[list[dict]]) -> tuple[list[dict], str]:
    """The first training samples; without them, built-in text tokenized by the merged model's tokenizer."""
    import transformers

    if samples:
        rows = [{key: list(row[key]) for key in ("input_ids", "labels", "position_ids") if key in row}
                for row in samples[:count]]
        return rows, "training samples"
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
    texts = [VERIFICATION_TEXTS[i % len(VERIFICATION_TEXTS)] for i in range(count)]
    rows = [{"input_ids": tokenizer(text)["input_ids"]} for text in texts]
    return rows, "built-in text"


def forward(model, row: dict) -> tuple[torch.Tensor, float, int]:
    """Logits (fp32, on CPU) and summed next-token NLL over the trained tokens (all tokens without labels)."""
    device = next(model.parameters()).device
    columns = {key: torch.tensor([row[key][:VERIFY_MAX_TOKENS]], device=device)
               for key in ("input_ids", "position_ids") if key in row}  # packed rows restart positions per sample
    with torch.no_grad():
        logits = model(**columns, use_cache=False).logits[0].float()
    targets = torch.tensor(row.get("labels", row["input_ids"])[1:VERIFY_MAX_TOKENS], device=device)
    counted = targets != -100
    nll = torch.nn.functional.cross_entropy(logits[:-1][counted], targets[counted], reduction="sum").item()
    return logits.cpu(), nll, int(counted.sum())


def load_reference(base_dir: str, adapter_dir: str, loading: Optional[BaseLoading], vocab_size: int,
                   trust_remote_code: bool, base_config=None):
    """Base + adapter as training ran it, computed in fp32: a 4/8-bit base is quantized like the run, then
    dequantized (bitsandbytes' CPU inference kernel computes in bf16, which would blur the comparison)."""
    import peft
    import transformers

    kwargs = {"dtype": torch.float32, "device_map": {"": verification_device()}}
    if loading is not None and loading.bits in (4, 8):
        compute = getattr(torch, loading.dtype)
        kwargs = {"dtype": compute, "device_map": {"": verification_device()},
                  "quantization_config": bitsandbytes_config(loading.bits, compute, loading.quant_type,
                                                             loading.double_quant, loading.quant_storage)}
    if base_config is not None:
        kwargs["config"] = base_config
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=trust_remote_code, **kwargs)
    if "quantization_config" in kwargs:
        base = base.dequantize(dtype=torch.float32).float()
    if base.get_input_embeddings().weight.shape[0] != vocab_size:
        base.resize_token_embeddings(vocab_size)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def verification_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def verify_merge(merged_dir: str, base_dir: str, adapter_dir: str, loading: Optional[BaseLoading], merge_base: str,
                 count: int, samples: Optional[list[dict]], trust_remote_code: bool, base_config=None) -> dict:
    """Merged model vs base+adapter, one model in memory at a time (fp32; on the GPU when there is one), on the
    same rows; the report goes to the log and to merge_verification.json."""
    import gc

    import transformers

    rows, source = verification_rows(merged_dir, count, samples)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=torch.float32, device_map={"": verification_device()}, trust_remote_code=trust_remote_code
    ).eval()
    vocab_size = merged.get_input_embeddings().weight.shape[0]
    merged_out = [forward(merged, row) for row in rows]
    del merged
    gc.collect()
    reference = load_reference(base_dir, adapter_dir, loading, vocab_size, trust_remote_code, base_config)
    reference_out = [forward(reference, row) for row in rows]
    del reference
    gc.collect()
    differences = [(a[0] - b[0]).abs() for a, b in zip(merged_out, reference_out)]
    agree = sum(int((a[0].argmax(-1) == b[0].argmax(-1)).sum()) for a, b in zip(merged_out, reference_out))
    positions = sum(d.shape[0] for d in differences)
    tokens = sum(out[2] for out in merged_out)
    report = {
        "merge_base": merge_base,
        "reference": f"base loaded as {loading.describe() if loading and loading.bits in (4, 8) else 'float32'} + adapter"
                     + (", dequantized" if loading and loading.bits in (4, 8) else ""),
        "samples": len(rows),
        "sample_source": source,
        "positions": positions,
        "max_abs_logit_diff": max(d.max().item() for d in differences),
        "mean_abs_logit_diff": sum(d.sum().item() for d in differences) / sum(d.numel() for d in differences),
        "argmax_agreement": agree / positions,
        "perplexity_merged": math.exp(sum(out[1] for out in merged_out) / max(tokens, 1)),
        "perplexity_reference": math.exp(sum(out[1] for out in reference_out) / max(tokens, 1)),
        "scored_tokens": tokens,
    }
    staging = os.path.join(merged_dir, f".{VERIFICATION_FILE}.tmp")
    with open(staging, "w") as handle:
        json.dump(report, handle, indent=2)
    os.replace(staging, os.path.join(merged_dir, VERIFICATION_FILE))
    logger.info("merge check on %d samples (%s) vs %s: max |logit diff| %.3g, mean %.3g, argmax agreement %.1f%%, perplexity "
                "%.4g merged vs %.4g reference (%s)", len(rows), source, report["reference"],
                report["max_abs_logit_diff"], report["mean_abs_logit_diff"], 100 * report["argmax_agreement"],
                report["perplexity_merged"], report["perplexity_reference"], VERIFICATION_FILE)
    return report
