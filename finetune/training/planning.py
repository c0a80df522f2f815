"""`--dry_run`: the plan of a run — world size, batch arithmetic, steps, trainable parameters and an estimate of the
memory each device needs — computed from the model's config (never its weights) and the tokenized data.

It lives apart from train.py because the memory model is a page of arithmetic a reader of train.py does not need.

How the estimate is derived (bytes per device; p = bytes of the compute dtype: 2 with --bf16/--fp16, else 4):
- parameters are counted on an empty (meta-device) model built from the config, with the vocabulary resized to the
  tokenizer; "quantizable" = the linear layers except the output head (what bitsandbytes quantizes, what
  `--lora_modules all` adapts).
- weights: --bits 4: 0.5 B per quantized parameter plus its constants (an fp32 absmax per 64 weights, or with
  --double_quant an 8-bit one plus an fp32 per 256 blocks); --bits 8: 1 B plus an fp32 scale per row; --bits 16: 2 B;
  --bits 32: 4 B. With --bits 4/8, peft's k-bit preparation casts the other weights (embeddings, norms, head) to
  fp32. LoRA adapters are fp32 (peft's autocast_adapter_dtype); new tokens add trainable copies of the embedding
  and head (modules_to_save).
- gradients: one per trainable parameter, in its dtype.
- optimizer: per trainable parameter, the optimizer's states (AdamW 2, Lion 1, SGD 1 with momentum, Adafactor
  factored: ~0) in the parameter's dtype (torch) or fp32 / 8-bit (bitsandbytes).
- DeepSpeed: mixed precision keeps 16-bit weights and gradients plus an fp32 master copy and fp32 Adam states
  (2 + 2 + 12 B per trainable parameter, the ZeRO paper's accounting); ZeRO-1 divides the 12 by the world size,
  ZeRO-2 also the gradients, ZeRO-3 also the weights; offload_optimizer/offload_param move them to CPU memory.
  FSDP (full shard) divides weights, gradients and optimizer states by the world size.
- activations, per token of the longest micro-batch (--per_device_train_batch_size x the longest prepared row):
  each decoder layer keeps p x (8 h + 3 kv + 4 f) (h hidden, kv the key/value width, f the MLP width; 6 h with a
  frozen base, whose norms need not keep their outputs), plus p x heads x length with eager attention (the
  probabilities; sdpa/flash keep none), plus the LoRA A outputs (p x r per adapted layer) and, with
  --lora_dropout, the dropped inputs (p + 1 per input feature). The trained-token loss (--chunked_cross_entropy,
  the default) keeps only the trained positions' hidden states (p x h, counted for every token); the plain loss
  keeps its fp32 log-softmax of every position's logits, 4 x vocab. With --gradient_checkpointing a layer keeps only its input
  (p x h).
- backward_peak: what the backward allocates for a while on top of the activations, the larger of: the loss's
  (the trained-token loss recomputes one chunk's logits, their fp32 copy and its gradient,
  min(--cross_entropy_chunk_size, tokens) x vocab x (p + 8); the plain loss has the fp32 gradient of every
  position's logits, tokens x vocab x 4) and, with --gradient_checkpointing, the one layer recomputed at a time. Frozen bottom layers (--layers_to_freeze) keep nothing. Checked on the tiny model against the bytes
  actually allocated in a forward pass (tests/test_planning.py; figures in BENCHMARKS.md).
Not counted: the CUDA context and allocator slack (typically 1-3 GiB), communication buckets, eval batches.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass

from finetune.checks.preflight import deepspeed_settings
from finetune.config.precision import Precision
from finetune.config.schema import enum_value
from finetune.modeling import knobs
from finetune.runtime import without_zero3_init

logger = logging.getLogger(__name__)

GIB = 2**30
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# optimizer -> (states per trainable parameter, bytes per state or None for "the parameter's own dtype")
OPTIMIZER_STATES = {
    "adamw_torch": (2, None), "adamw_torch_fused": (2, None), "adamw_torch_4bit": (2, 0.5), "adamw_torch_8bit": (2, 1),
    "adamw_8bit": (2, 1), "adamw_bnb_8bit": (2, 1), "paged_adamw_8bit": (2, 1), "paged_adamw_32bit": (2, 4),
    "adamw_apex_fused": (2, 4), "lion_8bit": (1, 1), "paged_lion_8bit": (1, 1), "lion_32bit": (1, 4),
    "paged_lion_32bit": (1, 4), "sgd": (1, None), "adafactor": (0, None), "adagrad": (1, None), "rmsprop": (1, None),
}


@dataclass
class ParameterCounts:
    total: int  # every weight of the (resized) model, tied weights once
    quantizable: int  # linear layers except the output head
    trainable: int
    lora: int  # adapter weights (A and B), 0 for a full fine-tune
    saved_copies: int  # modules_to_save copies (embedding / head trained in full next to an adapter)


@dataclass
class Plan:
    world_size: int
    micro_batch: int
    accumulation: int
    samples_per_step: int
    train_samples: int
    steps_per_epoch: int
    epochs: float
    total_steps: int
    warmup_steps: int
    longest_row: int
    real_tokens_per_step: float
    trained_token_fraction: float
    parameters: ParameterCounts
    memory_gib: dict  # weights / gradients / optimizer / activations / total, per device, at the longest row
    memory_gib_at_max_len: dict  # the same with every row --model_max_len long (the worst case)
    memory_notes: list

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def count_parameters(config, vocab_size: int, args, new_tokens: bool) -> ParameterCounts:
    import torch
    import transformers

    with torch.device("meta"), without_zero3_init():
        model = transformers.AutoModelForCausalLM.from_config(config)
        if vocab_size > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(vocab_size, mean_resizing=False)  # meta tensors: no statistics to draw
    head = model.get_output_embeddings()
    frozen = knobs.frozen_layer_count(args.layers_to_freeze, args.layer_freeze_ratio, config.num_hidden_layers)
    if args.full_finetune:
        if frozen:
            knobs.freeze_bottom_layers(model, frozen, new_tokens)
        total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
        quantizable = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return ParameterCounts(total, quantizable, trainable, 0, 0)
    in_frozen_layers = set()
    if frozen:
        _, layers = knobs.decoder_layers(model)
        in_frozen_layers = {id(m) for layer in list(layers)[:frozen] for m in layer.modules()}
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not head}
    total = sum(p.numel() for p in model.parameters())
    quantizable = sum(m.weight.numel() for m in linears.values())
    wanted = None if args.lora_modules.strip() == "all" else {n.strip() for n in args.lora_modules.split(",")}
    targets = [m for name, m in linears.items()
               if (wanted is None or name.rsplit(".", 1)[-1] in wanted) and id(m) not in in_frozen_layers]
    lora = sum(args.lora_r * (m.in_features + m.out_features) for m in targets)
    copies = 0
    if new_tokens:
        embeddings = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight}
        if head is not None:
            embeddings[id(head.weight)] = head.weight
        copies = sum(w.numel() for w in embeddings.values())
    return ParameterCounts(total, quantizable, lora + copies, lora, copies)


def estimate_memory(config, counts: ParameterCounts, args, micro_batch: int, row_length: int, world_size: int,
                    attn_implementation: str, fsdp: bool = False, preference: str | None = None) -> tuple[dict, list]:
    """Bytes per device for weights / gradients / optimizer / activations (see the module docstring). With a
    preference method (--rl) each micro-batch is 2 x micro_batch rows (chosen and rejected), and a full fine-tune
    with a reference (dpo, ipo) holds a frozen copy of the weights; LoRA's reference is the same weights."""
    p = Precision.from_args(args).compute_bytes
    notes = []
    other = counts.total - counts.quantizable
    if args.bits == 4:
        constants = counts.quantizable / 64 * (1 + 4 / 256) if args.double_quant else counts.quantizable / 64 * 4
        frozen = counts.quantizable * 0.5 + constants + other * 4
    elif args.bits == 8:
        frozen = counts.quantizable * 1 + counts.quantizable / config.hidden_size * 4 + other * 4
    else:
        frozen = counts.total * (2 if args.bits == 16 else 4)
    if args.full_finetune:
        weights, trainable_bytes = frozen, 2 if args.bits == 16 else 4
    else:
        weights, trainable_bytes = frozen + counts.trainable * 4, 4
    gradients = counts.trainable * trainable_bytes
    states, state_bytes = OPTIMIZER_STATES.get(str(enum_value(args.optim)), (2, None))
    optimizer = counts.trainable * states * (state_bytes or trainable_bytes)
    ds = deepspeed_settings(args)
    if ds:
        mixed = Precision.from_args(args).compute_bytes
        gradients = counts.trainable * mixed
        optimizer = counts.trainable * (12 if mixed == 2 else 8)
        if ds["stage"] >= 1:
            optimizer /= world_size
        if ds["stage"] >= 2:
            gradients /= world_size
        if ds["stage"] >= 3:
            weights /= world_size
        if ds["offload_optimizer"]:
            notes.append(f"optimizer states ({optimizer / GIB:.2f} GiB per device) offloaded to CPU memory")
            optimizer = 0
        if ds["offload_param"]:
            notes.append(f"weights ({weights / GIB:.2f} GiB per device) offloaded to CPU memory")
            weights = 0
    if fsdp:  # full shard: weights, gradients and optimizer states each split over the ranks
        weights, gradients, optimizer = weights / world_size, gradients / world_size, optimizer / world_size
    tokens = micro_batch * row_length * (2 if preference else 1)
    kept, recomputed = activation_bytes_per_token(config, args, p, row_length, attn_implementation)
    if args.chunked_cross_entropy:
        loss = min(args.cross_entropy_chunk_size, tokens) * config.vocab_size * (p + 8)
    else:
        loss = tokens * config.vocab_size * 4
    memory = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": tokens * kept,
              "backward_peak": max(loss, tokens * recomputed)}
    if preference:
        memory["reference"] = frozen if (args.full_finetune and preference in ("dpo", "ipo")
                                         and not args.precompute_ref_log_probs) else 0
        notes.append(f"--rl {preference}: {2 * micro_batch} rows per micro-batch (chosen and rejected); reference: "
                     + ("a frozen copy of the weights" if memory["reference"] else "precomputed, none held"
                        if args.precompute_ref_log_probs else "none held" if preference in
                        ("orpo", "simpo") else "the same weights with the adapters disabled (no copy)"))
    memory["total"] = sum(memory.values())
    return memory, notes


def activation_bytes_per_token(config, args, p: int, row_length: int, attn_implementation: str
                               ) -> tuple[float, float]:
    """Per token: (bytes kept for the backward, bytes of the one layer recomputed at a time under activation
    checkpointing, 0 without it)."""
    hidden, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    vocab = config.vocab_size
    # a trained norm keeps its normalized input for its weight's gradient: two per layer, none with a frozen base
    norms = 2 * hidden if args.full_finetune else 0
    layer = p * (6 * hidden + norms + 3 * kv + 4 * ffn)
    if attn_implementation == "eager":
        layer += p * heads * row_length
    if not args.full_finetune:
        names = LLAMA_LINEARS if args.lora_modules.strip() == "all" else [n.strip() for n in args.lora_modules.split(",")]
        adapted_inputs = [ffn if name == "down_proj" else hidden for name in names]
        layer += p * args.lora_r * len(adapted_inputs)
        if args.lora_dropout > 0:
            layer += sum(adapted_inputs) * (p + 1)
    logits = p * hidden if args.chunked_cross_entropy else 4 * vocab  # what the loss keeps (see the docstring)
    outside = (p * 3 * hidden if args.full_finetune else 0) + logits  # embeddings' output, final norm; the loss's
    # nothing below the frozen layers needs a gradient, so they keep no activations
    layers -= knobs.frozen_layer_count(args.layers_to_freeze,
                                                args.layer_freeze_ratio, layers)
    if args.activation_checkpointing:
        return layers * p * hidden + outside, layer
    return layers * layer + outside, 0.0


def steps_per_epoch(train_samples: int, micro_batch: int, world_size: int, accumulation: int) -> int:
    """As the Trainer counts: each rank gets ceil(batches / world) micro-batches; a partial accumulation is a step."""
    batches_per_rank = math.ceil(math.ceil(train_samples / micro_batch) / world_size)
    return max(math.ceil(batches_per_rank / accumulation), 1)


def make_plan(config, tokenizer, train_set, args, max_len: int, world_size: int, attn_implementation: str,
              fsdp: bool = False, preference: str | None = None) -> Plan:
    vocab = max(config.vocab_size, len(tokenizer))
    counts = count_parameters(config, vocab, args, new_tokens=len(tokenizer) > config.vocab_size)
    lengths = [len(ids) for ids in train_set["input_ids"]]
    real = [sum(1 for label in labels if label != -100) for labels in train_set["labels"]]
    if preference:  # a pair row: its longer side sets the padded length
        lengths = [max(a, len(b)) for a, b in zip(lengths, train_set["rejected_input_ids"])]
        real = [a + sum(1 for label in labels if label != -100) for a, labels in zip(real, train_set["rejected_labels"])]
    micro, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    per_epoch = steps_per_epoch(len(lengths), micro, world_size, accumulation)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    warmup = args.warmup_steps if args.warmup_steps >= 1 else math.ceil(args.warmup_steps * total)
    memory, notes = estimate_memory(config, counts, args, micro, max(lengths), world_size, attn_implementation, fsdp,
                                    preference)
    worst, _ = estimate_memory(config, counts, args, micro, max_len, world_size, attn_implementation, fsdp, preference)
    samples_per_step = micro * accumulation * world_size
    return Plan(
        world_size=world_size, micro_batch=micro, accumulation=accumulation, samples_per_step=samples_per_step,
        train_samples=len(lengths), steps_per_epoch=per_epoch, epochs=args.num_train_epochs, total_steps=total,
        warmup_steps=int(warmup), longest_row=max(lengths),
        real_tokens_per_step=round(samples_per_step * sum(lengths) / len(lengths), 1),
        trained_token_fraction=round(sum(real) / sum(lengths), 4),
        parameters=counts, memory_gib={k: round(v / GIB, 6) for k, v in memory.items()},
        memory_gib_at_max_len={k: round(v / GIB, 6) for k, v in worst.items()}, memory_notes=notes,
    )


def describe(plan: Plan, args) -> str:
    c, m, w = plan.parameters, plan.memory_gib, plan.memory_gib_at_max_len
    what = "full fine-tune" if args.full_finetune else f"LoRA r {args.lora_r} on {args.lora_modules}"
    lines = [
        f"parameters: {count(c.total)}; trainable {count(c.trainable)} ({100 * c.trainable / c.total:.2f} %), {what}, --bits {args.bits}",
        f"batch: {plan.micro_batch} per device x {plan.accumulation} accumulation x {plan.world_size} processes = "
        f"{plan.samples_per_step} samples (~{plan.real_tokens_per_step:.0f} tokens, {100 * plan.trained_token_fraction:.0f} % trained) per optimizer step",
        f"steps: {plan.train_samples} training rows -> {plan.steps_per_epoch} per epoch x {plan.epochs:g} epochs = "
        f"{plan.total_steps} optimizer steps ({plan.warmup_steps} warmup)",
        f"memory per device, estimated (GiB): weights {m['weights']:.2f} + gradients {m['gradients']:.2f} + optimizer "
        f"{m['optimizer']:.2f} + activations {m['activations']:.2f} + backward peak {m['backward_peak']:.2f}"
        + (f" + reference model {m['reference']:.2f}" if "reference" in m else "") + " (longest micro-batch: "
        f"{plan.micro_batch} x {plan.longest_row} tokens) = {m['total']:.2f}; with rows of --model_max_len: "
        f"activations {w['activations']:.2f}, backward peak {w['backward_peak']:.2f}, total {w['total']:.2f}; plus CUDA context and allocator slack (1-3 GiB)",
    ]
    lines += [f"note: {note}" for note in plan.memory_notes]
    return "\n  ".join(["dry run plan (nothing trained or written):"] + lines)


def count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
