"""What a run leaves behind, in order: the final model or adapter (staged, then renamed into --output_dir), the
evaluation and predictions, the reports, the streamed merge into --merged_output_dir, the `completed` marker and
the hub push. Also the two ways to get outputs without training: --merge_only and a re-run of a completed run."""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING, Optional

import transformers

from dataset_formats import IGNORE_INDEX, end_token_id
from finetune.config.precision import Precision
from finetune.modeling import knobs
from finetune.modeling.adapters import MUTATED_INITS, convert_mutated_adapter
from finetune.modeling.tokenizer import load_tokenizer
from finetune.outputs import gguf_export, gptq_export, hub, inference, merging, reporting
from finetune.runtime import without_zero3_init
from finetune.training.stages import Stages, build_datasets, generation_config

if TYPE_CHECKING:
    from finetune.run_paths import RunPaths
    from train import DataArguments, GenerationArguments, ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)


def save_final(trainer, args: TrainingArguments, paths: RunPaths, tokenizer, gen_config) -> None:
    """The final model (full fine-tune) or adapter, with tokenizer and generation config, in --output_dir.
    Written to a temporary directory first (every rank takes part: DeepSpeed gathers), then each file is renamed
    into place; the `completed` marker, written after everything else, is what makes the outputs count."""
    staging = paths.staging()
    trainer.save_model(staging)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        gen_config.save_pretrained(staging)
        if not args.full_finetune:
            base_loading(args).save(staging)  # a later merge re-creates the weights the adapter trained against
        if args.init_lora_weights in MUTATED_INITS and not args.lora_model_dir:
            convert_mutated_adapter(staging, paths.initial_adapter)
        for name in os.listdir(staging):
            target = os.path.join(paths.final, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    logger.info("saved %s to %s", "model" if args.full_finetune else "adapter", paths.final)


def finish_training(stages: Stages, model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments,
                    paths: RunPaths) -> int:
    """After training: final eval, predictions, reports, merge, completed marker, push. 0, or 4 when the push
    failed (everything is saved; a re-run retries only the push)."""
    trainer, tokenizer, gen_config = stages.trainer, stages.tokenizer, stages.gen_config
    if args.do_eval and stages.eval_set is not None:
        trainer.save_metrics("eval", trainer.evaluate())
    if args.do_predict:  # every rank generates (ZeRO-3 gathers weights); rank 0 writes
        dataset = stages.eval_set if stages.eval_set is not None else stages.train_set
        inference.write_predictions(trainer, tokenizer, dataset, gen_config, args.generation_samples, paths.final)
    trainer.accelerator.wait_for_everyone()
    if not (args.do_train and trainer.is_world_process_zero()):
        return 0
    global_step = trainer.state.global_step
    report = reporting.build_report(trainer, model_args, data_args, args, paths, tokenizer, gen_config, stages.stats)
    reporting.write_output_extras(paths.final, report)
    stages.trainer = stages.model = None  # free the training copy before the merge loads the base again
    del trainer
    if paths.merged:
        merge_adapter(model_args, args, paths, tokenizer, gen_config,
                      first_samples(stages.train_set, args.merge_verify_samples))
        reporting.write_output_extras(paths.merged, report)
    export_gguf(data_args, args, paths, tokenizer, stages.train_set)
    export_gptq(data_args, args, paths, tokenizer, stages.train_set)
    paths.mark_completed(global_step)
    return 0 if hub.push_outputs(args, paths) else 4


def base_loading(args: TrainingArguments) -> merging.BaseLoading:
    """How load_model loads the base for these flags; saved with the adapter, read back by later merges."""
    precision = Precision.from_args(args)
    return merging.BaseLoading(bits=args.bits, dtype=precision.load_dtype, quant_type=args.quant_type,
                               double_quant=args.double_quant, quant_storage=args.quant_storage)


def merge_adapter(model_args: ModelArguments, args: TrainingArguments, paths: RunPaths, tokenizer, gen_config,
                  samples=None) -> dict:
    """The adapter in --output_dir + the base -> a plain model in --merged_output_dir, streamed (see outputs/merging.py),
    in the run's compute dtype (bf16 with --bf16, fp16 with --fp16, else fp32)."""
    with without_zero3_init():  # rank 0 merges alone: no ZeRO-3 collective construction
        return merging.merge_adapter(
            model_args.model_name_or_path, paths.final, paths.merged, Precision.from_args(args).torch_dtype(),
            merge_base=args.merge_base, trained_against=base_loading(args), tokenizer=tokenizer,
            generation_config=gen_config, verify_samples=args.merge_verify_samples, samples=samples,
            trust_remote_code=model_args.trust_remote_code, base_config=knobs.rope_scaled_config(model_args),
        )


def merge_only(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments,
               gen_args: GenerationArguments, paths: RunPaths) -> int:
    """--merge_only: the tokenizer and generation config saved with the adapter go with the merged model."""
    if args.process_index != 0:  # launched with several processes: one merge is enough
        return 0
    saved = paths.final
    has_tokenizer = os.path.isfile(os.path.join(saved, "tokenizer_config.json"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(saved) if has_tokenizer else load_tokenizer(model_args, data_args)
    if os.path.isfile(os.path.join(saved, "generation_config.json")):
        gen_config = transformers.GenerationConfig.from_pretrained(saved)
    else:
        gen_config = generation_config(gen_args, tokenizer, data_args.dataset_format)
    samples = train_set = None
    if data_args.dataset and args.merge_verify_samples:
        train_set, _, _ = build_datasets(data_args, args, paths, tokenizer, write=False)  # --output_dir is never changed
        samples = first_samples(train_set, args.merge_verify_samples)
    merge_adapter(model_args, args, paths, tokenizer, gen_config, samples)
    reporting.write_output_extras(paths.merged, reporting.load_report(saved))
    if args.export_gptq and train_set is None:
        train_set, _, _ = build_datasets(data_args, args, paths, tokenizer, write=False)
    export_gguf(data_args, args, paths, tokenizer, train_set)
    export_gptq(data_args, args, paths, tokenizer, train_set)
    return 0


def finish_completed_run(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments,
                         gen_args: GenerationArguments, paths: RunPaths) -> int:
    """A re-run of a completed run trains nothing: it only completes a missing merge and a failed push."""
    logger.info("this run already completed; its outputs are in %s (pass --overwrite_output_dir to train again)",
                paths.final)
    if paths.merge_is_missing() and args.process_index == 0:
        tokenizer = load_tokenizer(model_args, data_args)
        merge_adapter(model_args, args, paths, tokenizer, generation_config(gen_args, tokenizer, data_args.dataset_format))
        reporting.write_output_extras(paths.merged, reporting.load_report(paths.final))
    exported = os.path.join(paths.merged or paths.final, "gguf", "export_verification.json")
    if args.export_gguf and args.process_index == 0 and not os.path.isfile(exported):
        export_gguf(data_args, args, paths, load_tokenizer(model_args, data_args), None)
    quantized = os.path.join(paths.merged or paths.final, f"gptq-{args.export_gptq}bit", "gptq_verification.json")
    if args.export_gptq and args.process_index == 0 and not os.path.isfile(quantized):
        tokenizer = load_tokenizer(model_args, data_args)
        train_set, _, _ = build_datasets(data_args, args, paths, tokenizer, write=False)
        export_gptq(data_args, args, paths, tokenizer, train_set)
    if args.process_index == 0 and not hub.push_outputs(args, paths):
        return 4
    return 0


def export_gguf(data_args: DataArguments, args: TrainingArguments, paths: RunPaths, tokenizer, train_set) -> None:
    """--export_gguf: the merged model (a full fine-tune: the final one) as GGUF files, stopping at the formats'
    end-of-turn token, verified on the first training samples' text (outputs/gguf_export.py)."""
    if not args.export_gguf:
        return
    ends = {end_token_id(name, tokenizer) for name in data_args.dataset_format} - {tokenizer.eos_token_id}
    texts = [tokenizer.decode(train_set[i]["input_ids"], skip_special_tokens=True)
             for i in range(min(16, len(train_set)))] if train_set is not None else []
    prompt = None
    if train_set is not None and len(train_set):  # the first sample's prompt: its ids before the first trained one
        first = train_set[0]
        trained = next((i for i, label in enumerate(first["labels"]) if label != IGNORE_INDEX), 0)
        prompt = first["input_ids"][:trained] or None
    gguf_export.export_gguf(paths.merged or paths.final, list(args.export_gguf), tokenizer,
                            end_of_turn=min(ends) if ends else None, system_prompt=data_args.default_system_prompt,
                            sample_texts=texts, prompt_ids=prompt)


def export_gptq(data_args: DataArguments, args: TrainingArguments, paths: RunPaths, tokenizer, train_set) -> None:
    """--export_gptq: the merged model (a full fine-tune: the final one) GPTQ-quantized, calibrated on the first
    --quantization_max_samples training samples (outputs/gptq_export.py)."""
    if not args.export_gptq:
        return
    samples = gptq_export.calibration_samples(train_set, args.quantization_max_samples, data_args.model_max_len)
    gptq_export.export_gptq(paths.merged or paths.final, args.export_gptq, args.gptq_group_size, tokenizer, samples)


def first_samples(train_set, count: int) -> Optional[list[dict]]:
    return [train_set[i] for i in range(min(count, len(train_set)))]
