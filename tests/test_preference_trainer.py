"""finetune/training/preference_trainer.py on a tiny LoRA model: the loss of a batch equals DPO computed from the
full log-softmax of the policy and of the base model loaded on its own (so the reference really is the base with
its adapters off, and no second copy is made), and training raises the chosen-minus-rejected margin."""

from __future__ import annotations

import pytest
import torch
from conftest import build_stages, instructions, write_jsonl
from datasets import Dataset
from transformers import AutoModelForCausalLM

from finetune.data.pipeline import encode_record, format_options
from finetune.training.loss import IGNORE_INDEX
from finetune.training.preference_trainer import PairCollator, PreferenceSettings, PreferenceTrainer
from finetune.training.trainer import trainer_arguments

FLAGS = ("--bits", "32", "--lora_r", "8", "--lora_alpha", "16", "--per_device_train_batch_size", "4",
         "--learning_rate", "5e-3", "--logging_steps", "5", "--save_strategy", "no", "--disable_tqdm", "true",
         "--seed", "5", "--max_steps", "40", "--lr_scheduler_type", "constant")


def pairs(built, n: int) -> Dataset:
    """Chosen: the record's own answer; rejected: another record's; both rendered by the airoboros format."""
    records = instructions(n)
    options = format_options(built.data_args, built.tokenizer)
    rows = []
    for i, record in enumerate(records):
        wrong = {**record, "response": records[(i + 7) % n]["response"]}
        (chosen_ids, chosen_labels, _), = encode_record(record, "airoboros", built.tokenizer, built.data_args, options)[0]
        (rejected_ids, rejected_labels, _), = encode_record(wrong, "airoboros", built.tokenizer, built.data_args, options)[0]
        start = chosen_labels.index(next(label for label in chosen_labels if label != IGNORE_INDEX))
        assert chosen_ids[:start] == rejected_ids[:start]  # the shared prompt
        rows.append({"input_ids": chosen_ids, "labels": chosen_labels,
                     "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels})
    return Dataset.from_list(rows)


def full_logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    targets = batch["preference_labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logp * (targets != IGNORE_INDEX)).sum(-1)


@pytest.fixture
def dpo(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", instructions(8))
    built = build_stages(tiny_model, data, tmp_path / "out", *FLAGS)
    train_pairs = pairs(built, 32)
    trainer = PreferenceTrainer(
        model=built.model, args=trainer_arguments(built.args, built.paths), train_dataset=train_pairs,
        data_collator=PairCollator(built.tokenizer.pad_token_id), processing_class=built.tokenizer,
        preference_settings=PreferenceSettings("dpo", beta=0.1))
    return built, trainer, train_pairs


def test_the_dpo_loss_of_a_batch_uses_the_base_with_adapters_off_as_reference(tiny_model, dpo):
    built, trainer, train_pairs = dpo
    with torch.no_grad():  # move the adapters away from zero, so policy and reference differ
        for name, param in built.model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    assert trainer.reference_model is None  # LoRA: no copy
    batch = PairCollator(built.tokenizer.pad_token_id)([train_pairs[i] for i in range(4)])
    built.model.train()
    loss = trainer.compute_loss(built.model, batch)
    policy = full_logps(built.model.eval(), batch)
    reference = full_logps(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), batch)
    assert (policy - reference).abs().max() > 1e-3
    z = 0.1 * ((policy[:4] - policy[4:]) - (reference[:4] - reference[4:]))
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(z).mean().item(), abs=1e-5)
    assert trainer.pending["train"][0]["rewards/chosen"] == pytest.approx((0.1 * (policy[:4] - reference[:4])).mean().item(), abs=1e-5)


def test_dpo_training_raises_the_margin_and_logs_rewards(dpo):
    built, trainer, train_pairs = dpo
    batch = PairCollator(built.tokenizer.pad_token_id)([train_pairs[i] for i in range(len(train_pairs))])

    def margin() -> float:
        built.model.eval()
        with torch.no_grad():
            logps = trainer.response_logps(built.model, batch, trainer.head_split)
        half = logps.total.shape[0] // 2
        return (logps.total[:half] - logps.total[half:]).mean().item()

    before = margin()
    trainer.train()
    after = margin()
    assert after > before + 0.3, (before, after)  # measured: 0.003 -> 0.65 nats
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("rewards/margins" in entry and "rewards/accuracies" in entry for entry in logged)
    assert logged[-1]["rewards/accuracies"] > 0.5 and logged[-1]["loss"] < logged[0]["loss"]


@pytest.mark.parametrize("method", ["ipo", "simpo", "orpo"])
def test_the_other_pair_methods_train(dpo, method):
    built, trainer, train_pairs = dpo
    trainer.settings = PreferenceSettings(method, beta=0.1)
    trainer.args.max_steps = 10
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)


def test_a_full_fine_tune_keeps_a_frozen_reference_copy(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", instructions(8))
    flags = [f for f in FLAGS if f not in ("--lora_r", "8", "--lora_alpha", "16")]
    built = build_stages(tiny_model, data, tmp_path / "out", *flags, "--full_finetune", "--max_steps", "5")
    train_pairs = pairs(built, 8)
    trainer = PreferenceTrainer(
        model=built.model, args=trainer_arguments(built.args, built.paths), train_dataset=train_pairs,
        data_collator=PairCollator(built.tokenizer.pad_token_id), processing_class=built.tokenizer,
        preference_settings=PreferenceSettings("dpo", beta=0.1))
    assert trainer.reference_model is not None and trainer.reference_model is not built.model
    assert not any(p.requires_grad for p in trainer.reference_model.parameters())
    trainer.train()
    batch = PairCollator(built.tokenizer.pad_token_id)([train_pairs[i] for i in range(4)])
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    reference = trainer.reference_logps(built.model, batch).total.double()
    assert torch.allclose(reference, full_logps(base, batch), atol=1e-4)  # the copy stayed at the start
    assert (full_logps(built.model.eval(), batch) - reference).abs().max() > 1e-3  # the policy moved
