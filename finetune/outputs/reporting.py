"""What every output directory carries besides the weights: metrics.json, training_curves.png and a README.md
model card (the hub push is outputs/hub.py).

It only reads what a run produced (the Trainer's log history, the arguments, the
prepared data's stats.json, the tokenizer's chat template) and writes documents; the same report is written into
the final directory, the merged directory, and again into the merged directory when a re-run only completes the
merge (it is read back from the final directory's metrics.json then).
"""

from __future__ import annotations

import json
import logging
import os
from statistics import mean
from typing import Optional

from finetune.config.precision import Precision
from finetune.config.schema import enum_value
from finetune.fileio import write_atomically
from finetune.outputs import inference
from finetune.outputs.hub import hub_repo_id

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"
CARD_FILE = "README.md"
EXAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


# --- the report: numbers and settings of one run ----------------------------------------------------------------------


def build_report(trainer, model_args, data_args, args, paths, tokenizer, gen_config, stats: dict) -> dict:
    """Everything the three documents need, from the trained Trainer (rank 0, after training and evaluation) and
    the data statistics build_datasets returned."""
    return {
        "metrics": run_metrics(trainer),
        "settings": run_settings(model_args, data_args, args, paths, tokenizer, gen_config, stats),
        "log_history": trainer.state.log_history,
    }


def run_metrics(trainer) -> dict:
    state, history = trainer.state, trainer.state.log_history
    losses = [entry for entry in history if "loss" in entry]
    evals = [entry for entry in history if "eval_loss" in entry]
    final = next((entry for entry in reversed(history) if "train_loss" in entry), {})
    speeds = [entry["tokens_per_second"] for entry in losses if "tokens_per_second" in entry]
    session_speed = next((entry["train_tokens_per_second"] for entry in reversed(losses) if "train_tokens_per_second" in entry), None)
    mfus = [entry["mfu"] for entry in losses if "mfu" in entry]
    meter = trainer.throughput
    best = min(evals, key=lambda entry: entry["eval_loss"]) if evals else None
    metrics = {
        "global_step": state.global_step,
        "epoch": round(state.epoch, 4) if state.epoch is not None else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "train_loss": final.get("train_loss"),  # the Trainer's mean over this session's steps
        "train_runtime_s": final.get("train_runtime"),
        "num_input_tokens_seen": state.num_input_tokens_seen or None,
        "tokens_per_second": session_speed if session_speed is not None else (round(mean(speeds), 1) if speeds else None),
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "best_eval_loss": best["eval_loss"] if best else None,
        "best_eval_step": best["step"] if best else None,
        "mfu": round(mean(mfus), 5) if mfus else None,
        "peak_tflops_per_device": meter.peak / 1e12 if meter and meter.peak else None,
        "model_gflops_per_token": round(meter.flops_per_token / 1e9, 6) if meter else None,
        "counted_tflops_per_step": meter.counted_flops_per_step / 1e12 if meter and meter.counted_flops_per_step else None,
    }
    return {name: value for name, value in metrics.items() if value is not None}


def run_settings(model_args, data_args, args, paths, tokenizer, gen_config, stats: dict) -> dict:
    template = bool(tokenizer.chat_template)
    prompt_format = None if template else next(iter(data_args.dataset_format))
    example = EXAMPLE_CONVERSATION if template or has_chat_layout(prompt_format) else EXAMPLE_CONVERSATION[1:2]
    try:
        example_prompt = inference.prompt_text(tokenizer, example, prompt_format)
    except (inference.PromptError, ValueError) as error:
        example_prompt = f"(no example: {error})"
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return {
        "base_model": model_args.model_name_or_path,
        "datasets": list(data_args.dataset),
        "dataset_format": list(data_args.dataset_format),
        "train_samples": (stats.get("train") or {}).get("samples_kept"),
        "train_tokens": (stats.get("train") or {}).get("tokens"),
        "trained_token_fraction": (stats.get("train") or {}).get("trained_token_fraction"),
        "eval_samples": (stats.get("eval") or {}).get("samples_kept", 0),
        "full_finetune": args.full_finetune,
        "bits": args.bits,
        "quant_type": args.quant_type,
        "double_quant": args.double_quant,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "lora_modules": args.lora_modules,
        "peft_method": args.peft_method,
        "lora_variants": [name for name, on in (("DoRA", args.use_dora), ("rsLoRA", args.use_rslora),
                                                (f"{args.init_lora_weights} init", args.init_lora_weights != "default"),
                                                (f"LoRA+ ratio {args.loraplus_lr_ratio:g}" if args.loraplus_lr_ratio
                                                 else "", bool(args.loraplus_lr_ratio))) if on],
        "lora_model_dir": args.lora_model_dir,
        "objective": objective(data_args, args),
        "precision": Precision.from_args(args).name,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(enum_value(args.lr_scheduler_type)),
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "optimizer": str(enum_value(args.optim)),
        "max_grad_norm": args.max_grad_norm,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "effective_batch_size": per_step,
        "model_max_len": data_args.model_max_len,
        "sample_packing": data_args.sample_packing,
        "activation_checkpointing": bool(args.activation_checkpointing),
        "seed": args.seed,
        "generation": {name: getattr(gen_config, name) for name in
                       ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty")},
        "chat_template": template,
        "prompt_format": prompt_format,
        "example_messages": example,
        "example_prompt": example_prompt,
        "final_output_dir": os.path.abspath(paths.final),
        "merged_output_dir": os.path.abspath(paths.merged) if paths.merged else None,
        "hub_model_id": hub_repo_id(args) if args.push_to_hub else None,
    }


def has_chat_layout(name: Optional[str]) -> bool:
    from dataset_formats import FORMAT_INFO

    return bool(name and FORMAT_INFO[name].chat_layout)


def load_report(directory: str) -> Optional[dict]:
    """The report written into `directory` (its metrics.json: the metrics, then settings and log_history), or
    None when there is none."""
    try:
        with open(os.path.join(directory, METRICS_FILE)) as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return None
    settings, log_history = saved.pop("settings", {}), saved.pop("log_history", [])
    return {"metrics": saved, "settings": settings, "log_history": log_history}


# --- the three documents ----------------------------------------------------------------------------------------------


def write_output_extras(directory: str, report: Optional[dict]) -> None:
    """metrics.json, training_curves.png and README.md into a finished output directory (final or merged)."""
    if report is None:
        logger.warning("no training report to write into %s (metrics.json of the run is missing)", directory)
        return
    kind = output_kind(directory, report["settings"])
    saved = {**report["metrics"], "settings": report["settings"], "log_history": report["log_history"]}
    write_atomically(os.path.join(directory, METRICS_FILE), json.dumps(saved, indent=2, default=str))
    plot_curves(report["log_history"], os.path.join(directory, CURVES_FILE), title=curves_title(report["settings"]))
    write_atomically(os.path.join(directory, CARD_FILE), model_card(directory, report, kind))
    logger.info("%s, %s and %s written to %s", METRICS_FILE, CURVES_FILE, CARD_FILE, directory)


def output_kind(directory: str, settings: dict) -> str:
    """adapter (LoRA weights only), merged (adapter merged into the base) or model (a full fine-tune)."""
    if os.path.isfile(os.path.join(directory, "adapter_config.json")):
        return "adapter"
    if settings.get("merged_output_dir") and os.path.abspath(directory) == settings["merged_output_dir"]:
        return "merged"
    return "model"


def method(settings: dict) -> str:
    if settings["full_finetune"]:
        return f"full fine-tune ({settings['bits']}-bit weights)"
    quantized = {4: f"QLoRA (4-bit {settings['quant_type']} base{', double quantization' if settings['double_quant'] else ''})",
                 8: "QLoRA (8-bit base)"}.get(settings["bits"], f"LoRA ({settings['bits']}-bit base)")
    if settings.get("peft_method") == "llama_adapter":
        return f"LLaMA-Adapter (adaption prompts) on a {settings['bits']}-bit base"
    if settings.get("lora_model_dir"):
        return f"{quantized}, continuing the LoRA adapter in {settings['lora_model_dir']}"
    modules = "every linear layer but the output head" if settings["lora_modules"].strip() == "all" else settings["lora_modules"]
    variants = "".join(f", {name}" for name in settings.get("lora_variants") or [])
    return (f"{quantized}, LoRA r={settings['lora_r']}, alpha={settings['lora_alpha']:g}, dropout "
            f"{settings['lora_dropout']:g} on {modules}{variants}")


def objective(data_args, args) -> str | None:
    """--rl: the preference method and its settings, as the card says them; None for SFT."""
    if not data_args.rl:
        return None
    knobs = [f"beta {args.rl_beta:g}"] + ([f"gamma {args.simpo_gamma:g}"] if data_args.rl == "simpo" else []) + (
        [f"label smoothing {args.label_smoothing:g}"] if args.label_smoothing else []) + (
        [f"desirable weight {args.desirable_weight:g}, undesirable weight {args.undesirable_weight:g}"]
        if data_args.rl == "kto" else [])
    reference = ("the base with the adapters disabled" if not args.full_finetune else "a frozen copy of the starting "
                 "model") if data_args.rl in ("dpo", "ipo", "kto") else "none"
    if args.precompute_ref_log_probs:
        reference = f"{reference}, its log-probs precomputed"
    data = "desirable / undesirable answers" if data_args.rl == "kto" else "preference pairs"
    return f"{data_args.rl.upper()} on {data} ({', '.join(knobs)}; reference model: {reference})"


def curves_title(settings: dict) -> str:
    base = os.path.basename(settings["base_model"].rstrip("/"))
    if settings["full_finetune"]:
        return f"{base}: full fine-tune, {settings['bits']}-bit weights"
    kind = {4: f"QLoRA 4-bit {settings['quant_type']}", 8: "QLoRA 8-bit"}.get(settings["bits"], f"LoRA, {settings['bits']}-bit base")
    return f"{base}: {kind}, r={settings['lora_r']}"


def plot_curves(log_history: list[dict], path: str, title: str) -> None:
    """Training loss and eval loss (top) and learning rate (bottom) against the optimizer step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    series = {name: [(entry["step"], entry[name]) for entry in log_history if name in entry and "step" in entry]
              for name in ("loss", "eval_loss", "learning_rate")}
    if series["loss"]:
        loss_axes.plot(*zip(*series["loss"]), label="train loss", color="tab:blue", linewidth=1.2)
    if series["eval_loss"]:
        loss_axes.plot(*zip(*series["eval_loss"]), label="eval loss", color="tab:orange", marker="o", linewidth=1.5)
    if not series["loss"] and not series["eval_loss"]:
        loss_axes.text(0.5, 0.5, "no loss logged (raise the step count or lower --logging_steps)",
                       ha="center", va="center", transform=loss_axes.transAxes)
    else:
        loss_axes.legend()
    loss_axes.set_ylabel("loss")
    loss_axes.set_title(title)
    loss_axes.grid(alpha=0.3)
    if series["learning_rate"]:
        lr_axes.plot(*zip(*series["learning_rate"]), color="tab:green", linewidth=1.2)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("optimizer step")
    lr_axes.grid(alpha=0.3)
    figure.savefig(path + ".tmp", format="png")
    os.replace(path + ".tmp", path)


def model_card(directory: str, report: dict, kind: str) -> str:
    settings, metrics = report["settings"], report["metrics"]
    base = settings["base_model"]
    reference = model_reference(directory, settings, kind)
    subject = {
        "adapter": f"A LoRA adapter for `{base}`",
        "merged": f"`{base}` with a LoRA adapter merged into its weights",
        "model": f"A full fine-tune of `{base}`",
    }[kind]
    formats = ", ".join(f"`{name}`" for name in dict.fromkeys(settings["dataset_format"]))
    tags = ["train.py", "full-finetune" if settings["full_finetune"] else "qlora" if settings["bits"] in (4, 8) else "lora",
            *dict.fromkeys(settings["dataset_format"])]
    front = ["---", f"base_model: {base}", f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
             "pipeline_tag: text-generation", "tags:", *[f"- {tag}" for tag in tags], "---", ""]
    datasets = "\n".join(f"| `{path}` | `{name}` |" for path, name in
                         zip(settings["datasets"], settings["dataset_format"] * len(settings["datasets"])
                             if len(settings["dataset_format"]) == 1 else settings["dataset_format"]))
    fraction = settings.get("trained_token_fraction")
    unit = ("labelled answers" if "KTO" in settings["objective"] else "preference pairs") \
        if settings.get("objective") else "training samples"
    data_line = (f"{settings.get('train_samples', '?')} {unit} ({settings.get('train_tokens', '?')} tokens, "
                 f"{100 * fraction:.1f} % of them trained: the answers and their end tokens), "
                 if fraction is not None else "") + f"{settings.get('eval_samples', 0)} held out for evaluation."
    epochs = f"{metrics['epoch']:g} epochs" if "epoch" in metrics else f"{settings['num_train_epochs']:g} epochs"
    gen = settings["generation"]
    lines = front + [
        f"# {os.path.basename(os.path.abspath(directory))}",
        "",
        f"{subject}, trained with train.py on {', '.join(f'`{d}`' for d in settings['datasets'])} ({formats}).",
        "",
        "## Training data",
        "",
        "| dataset | format |",
        "|---|---|",
        datasets,
        "",
        data_line,
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| method | {method(settings)} |",
        f"| objective | {settings.get('objective') or 'SFT (next-token loss on the answers)'} |",
        f"| precision | {settings['precision']}{', activation checkpointing' if settings['activation_checkpointing'] else ''} |",
        f"| learning rate | {settings['learning_rate']:g}, {settings['lr_scheduler_type']} schedule, {warmup(settings['warmup_steps'])}, weight decay {settings['weight_decay']:g} |",
        f"| optimizer | {settings['optimizer']}, max grad norm {settings['max_grad_norm']:g} |",
        f"| length | {metrics.get('global_step', '?')} optimizer steps ({epochs}) |",
        f"| effective batch | {settings['effective_batch_size']} samples per step ({settings['per_device_train_batch_size']} per device x {settings['gradient_accumulation_steps']} accumulation x {settings['world_size']} processes) |",
        f"| max length | {settings['model_max_len']} tokens, packing {'on' if settings['sample_packing'] else 'off'} |",
        f"| seed | {settings['seed']} |",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {label} | {format_value(metrics[name])} |" for name, label in METRIC_LABELS if name in metrics],
        "",
        f"![Training loss, eval loss and learning rate by step]({CURVES_FILE})",
        "",
        "## How to use",
        "",
        f"Generation settings are saved in `generation_config.json` (max_new_tokens {gen['max_new_tokens']}, "
        f"{'sampling' if gen['do_sample'] else 'greedy'}; generation stops at the format's end-of-answer token).",
        "",
        "Chat with it from train.py's repository, with the project installed (`make install` or `pip install -e .`; "
        "the code is the `finetune` package, see its ARCHITECTURE.md): one-shot with `--prompt`, a prompt on stdin, "
        "or interactively:",
        "",
        "```bash",
        f"python scripts/chat.py {reference}"
        + (f" --dataset_format {settings['prompt_format']}" if settings["prompt_format"] else "")
        + ' --prompt "What is the capital of France?"',
        "```",
        "",
        f"In Python ({'peft' if kind == 'adapter' else 'transformers'}):",
        "",
        "```python",
        load_snippet(reference, kind, settings),
        "```",
        "",
        "## Prompt format",
        "",
        prompt_format_note(settings),
        "",
        "```json",
        json.dumps(settings["example_messages"], indent=1, ensure_ascii=False),
        "```",
        "",
        "becomes this prompt (the answer is generated right after it):",
        "",
        "```text",
        settings["example_prompt"],
        "```",
        "",
    ]
    return "\n".join(lines)


METRIC_LABELS = [
    ("final_loss", "final train loss (last log)"),
    ("train_loss", "mean train loss"),
    ("eval_loss", "eval loss (end)"),
    ("best_eval_loss", "best eval loss"),
    ("best_eval_step", "best eval step"),
    ("train_runtime_s", "train runtime (s)"),
    ("tokens_per_second", "tokens per second"),
    ("mfu", "model FLOPs utilization"),
]


def warmup(steps: float) -> str:
    """transformers 5 takes a ratio < 1 in --warmup_steps (legacy --warmup_ratio maps there)."""
    return f"warmup {steps:.1%} of the steps" if 0 < steps < 1 else f"{steps:g} warmup steps"


def format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_reference(directory: str, settings: dict, kind: str) -> str:
    """What users pass to from_pretrained: the hub repo when the run pushes there, else the local directory."""
    repo = settings.get("hub_model_id")
    if repo:
        return f"{repo}-merged" if kind == "merged" else repo
    return os.path.abspath(directory)


def load_snippet(reference: str, kind: str, settings: dict) -> str:
    loader = (["from peft import AutoPeftModelForCausalLM",
               "from transformers import AutoTokenizer, GenerationConfig",
               "",
               f'tokenizer = AutoTokenizer.from_pretrained("{reference}")',
               f'model = AutoPeftModelForCausalLM.from_pretrained("{reference}")  # the base named in adapter_config.json + this adapter',
               f'model.generation_config = GenerationConfig.from_pretrained("{reference}")  # max_new_tokens, stop tokens']
              if kind == "adapter" else
              ["from transformers import AutoModelForCausalLM, AutoTokenizer",
               "",
               f'tokenizer = AutoTokenizer.from_pretrained("{reference}")',
               f'model = AutoModelForCausalLM.from_pretrained("{reference}", dtype="auto")'])
    messages = 'messages = [{"role": "user", "content": "What is the capital of France?"}]'
    if settings["prompt_format"]:
        prompt = ["from finetune.outputs.inference import prompt_ids  # this project, installed: `pip install -e .`",
                  "",
                  messages,
                  f'input_ids = torch.tensor([prompt_ids(tokenizer, messages, "{settings["prompt_format"]}")])',
                  "output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))"]
        head = ["import torch", ""]
    else:
        prompt = ["", messages,
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")",
                  "input_ids = inputs[\"input_ids\"]",
                  "output = model.generate(**inputs)"]
        head = []
    return "\n".join(head + loader + prompt +
                     ["print(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))"])


def prompt_format_note(settings: dict) -> str:
    if settings["chat_template"]:
        return ("The tokenizer carries a chat template that reproduces the training layout token for token "
                "(verified against the training ids when the run started), so "
                "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives exactly the ids each "
                "answer followed in training. This conversation:")
    return (f"The `{settings['prompt_format']}` format has no chat layout, so the tokenizer carries no chat template: "
            "build prompts with `finetune.outputs.inference.prompt_ids(tokenizer, messages, "
            f"\"{settings['prompt_format']}\")` (or `scripts/chat.py --dataset_format {settings['prompt_format']}`), "
            "which renders the training format up to the answer; it is single-turn. This message:")
