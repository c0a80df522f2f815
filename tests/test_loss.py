"""The trained-token loss (finetune/training/loss.py) is transformers' loss, computed only where it is trained:
the same loss and the same gradient for every parameter (1e-5, fp32), whatever the batch looks like, and the Trainer
averages it over gradient accumulation exactly as before."""

from __future__ import annotations

import pytest
import torch
from conftest import build_stages, conversations, write_jsonl

from finetune.tiny_model import build_model
from finetune.training.loss import TrainedTokenLoss, trained_token_loss_sum

VOCAB = 300


def tiny_llama(tied: bool = False, seed: int = 0):
    model = build_model(VOCAB, 64, 2, seed, init_std=0.2)  # a larger init: logits far from uniform
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def batch(rows: int = 3, length: int = 40, packed: bool = False, seed: int = 1) -> dict:
    """Prompt-masked rows of different lengths, right-padded with an attention mask, or one packed row (no mask,
    position ids restarting per sample, each sample's first label masked as the packer does)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for row in range(rows):
        prompt = int(torch.randint(1, length // 2, (1,), generator=generator))
        used = length - 7 * row
        labels[row, :prompt] = -100
        labels[row, used:] = -100
        mask[row, used:] = 0
    if not packed:
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    lengths = [15, 9, 16]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids, labels = ids[:1, :sum(lengths)], labels[:1, :sum(lengths)].clone()
    starts = torch.tensor([0, 15, 24])
    labels[0, starts] = -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def plain_loss(model, inputs: dict, num_items=None):
    return model(**inputs, num_items_in_batch=num_items).loss


def chunked_loss(model, inputs: dict, chunk: int, num_items=None):
    loss, why_not = TrainedTokenLoss.for_model(model, chunk)
    assert loss is not None, why_not
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    with loss.capturing():
        outputs = model(**rest, logits_to_keep=1)
        value = loss(outputs, inputs["labels"], num_items)
    assert outputs.logits.shape[1] == 1  # the model itself computed one position's logits
    return value


def gradients(model, loss) -> dict:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(model, inputs: dict, chunk: int, num_items=None):
    plain = plain_loss(model, inputs, num_items)
    expected = gradients(model, plain)
    ours = chunked_loss(model, inputs, chunk, num_items)
    got = gradients(model, ours)
    ours, plain = ours.detach(), plain.detach()
    assert abs(float(ours) - float(plain)) <= 1e-5 * max(1.0, abs(float(plain))), (float(ours), float(plain))
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name
    assert float(plain) > 1.0  # a real loss, not a degenerate zero


@pytest.mark.parametrize("chunk", [7, 4096])  # several chunks per batch, and one
def test_full_model_unpacked_padded_batch(chunk):
    assert_same(tiny_llama(), batch(), chunk)


def test_packed_row_with_position_ids():
    assert_same(tiny_llama(), batch(packed=True), 5)


def test_tied_embeddings_get_both_gradients_through_one_weight():
    model = tiny_llama(tied=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert_same(model, batch(), 11)


def test_sum_over_a_count_given_by_the_trainer():
    """Under gradient accumulation the Trainer passes the step's trained-token count: sum / that count."""
    assert_same(tiny_llama(), batch(), 16, num_items=torch.tensor(500))


def test_lora_adapters_and_a_trained_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                                    init_lora_weights=False))
    assert_same(model, batch(), 9)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                    init_lora_weights=False))
    assert_same(model, batch(), 9)


def test_only_trained_positions_reach_the_head():
    model = tiny_llama()
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    inputs = batch()
    hidden = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    _, count = trained_token_loss_sum(hidden, inputs["labels"], model.lm_head, 10)
    handle.remove()
    trained = int((inputs["labels"][:, 1:] != -100).sum())
    assert count == trained == sum(seen) and max(seen) == 10 and trained < inputs["labels"].numel() * 0.8


def test_a_micro_batch_with_nothing_trained_gives_zero_and_zero_gradients():
    model = tiny_llama()
    inputs = batch()
    inputs["labels"][:] = -100
    loss = chunked_loss(model, inputs, 8, num_items=torch.tensor(10))
    grads = gradients(model, loss)
    assert float(loss) == 0.0 and "lm_head.weight" in grads and all(float(g.abs().max()) == 0 for g in grads.values())


def test_a_model_that_rescales_its_logits_falls_back_with_a_log_line(tmp_path, tiny_model, caplog):
    """A forward that changes the logits after the head (Cohere's logit_scale, Granite's logits_scaling) is caught
    on the first batch by comparing the model's own last-position logits: the run continues on the plain path."""
    data = write_jsonl(tmp_path / "d.jsonl", conversations(8))
    built = build_stages(tiny_model, data, tmp_path / "out", "--dataset_format", "airoboros_chat", "--max_steps", "1",
                         "--bits", "32", "--full_finetune")
    trainer = built.trainer
    assert trainer.trained_token_loss is not None
    head = trainer.model.lm_head
    handle = head.register_forward_hook(lambda m, i, o: o * 0.5 if o.dim() == 3 else None)  # the model's own call
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with caplog.at_level("WARNING", logger="finetune"):
        loss = trainer.compute_loss(trainer.model, inputs)
    handle.remove()
    assert trainer.trained_token_loss is None and trainer.compute_loss_func is None
    assert "plain transformers path from now on" in caplog.text and "differ from head" in caplog.text
    assert torch.isfinite(loss)


def test_plain_path_on_request_and_reasons_logged(tmp_path, tiny_model, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", conversations(8))
    with caplog.at_level("INFO", logger="finetune"):
        built = build_stages(tiny_model, data, tmp_path / "a", "--dataset_format", "airoboros_chat",
                             "--chunked_cross_entropy", "False")
        assert built.trainer.trained_token_loss is None and built.trainer.compute_loss_func is None
        built = build_stages(tiny_model, data, tmp_path / "b", "--dataset_format", "airoboros_chat",
                             "--label_smoothing_factor", "0.1")
        assert built.trainer.trained_token_loss is None
    assert "--chunked_cross_entropy False" in caplog.text and "LabelSmoother needs the full logits" in caplog.text


def trained(tmp_path, tiny_model, data: str, name: str, *flags: str):
    """One optimizer step; returns the trainer, the logged train loss, the eval loss and each trained weight's change."""
    built = build_stages(tiny_model, data, tmp_path / name, "--bits", "32", "--optim", "sgd",
                         "--learning_rate", "1.0", "--max_grad_norm", "0",
                         "--weight_decay", "0", "--lr_scheduler_type", "constant", "--max_steps", "1",
                         "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no",
                         "--eval_dataset_size", "4", "--eval_strategy", "steps", "--eval_steps", "100", "--seed", "3",
                         *flags)
    trainable = lambda: {k: p.detach().clone() for k, p in built.trainer.model.named_parameters()  # noqa: E731
                         if p.requires_grad}
    before = trainable()
    built.trainer.train()
    loss = next(entry["loss"] for entry in built.trainer.state.log_history if "loss" in entry)
    changes = {k: p - before[k] for k, p in trainable().items()}
    return built, loss, built.trainer.evaluate()["eval_loss"], changes


FULL = ("--full_finetune", "--dataset_format", "airoboros_chat")


@pytest.mark.parametrize("accumulation, packing, flags", [
    ("1", "False", FULL),
    ("4", "False", FULL),
    ("4", "True", FULL),
    # new layout tokens (resized embeddings and head) and NEFTune noise on the embeddings
    ("2", "False", ("--full_finetune", "--dataset_format", "chatml", "--neftune_noise_alpha", "5")),
    # LoRA with the resized embeddings and head trained in full (peft's modules_to_save wrappers)
    ("2", "True", ("--dataset_format", "chatml", "--lora_r", "4", "--lora_modules", "all")),
])
def test_one_sgd_step_through_the_trainer_moves_every_weight_as_the_plain_path(tmp_path, tiny_model, accumulation,
                                                                                packing, flags):
    """SGD with lr 1 and no clipping makes each weight's change minus its accumulated gradient: equal changes mean
    equal gradients over the micro-batches of the step (each with its own trained-token count), and equal logged
    train and eval losses mean the Trainer scaled both paths alike."""
    data = write_jsonl(tmp_path / "d.jsonl", conversations(24))
    common = ("--gradient_accumulation_steps", accumulation, "--sample_packing", packing, "--model_max_len", "128",
              "--cross_entropy_chunk_size", "13", *flags)
    ours, ours_loss, ours_eval, ours_changes = trained(tmp_path, tiny_model, data, "chunked", *common)
    assert ours.trainer.trained_token_loss is not None and ours.trainer.trained_token_loss.verified
    plain, plain_loss, plain_eval, plain_changes = trained(tmp_path, tiny_model, data, "plain", *common,
                                                           "--chunked_cross_entropy", "False")
    assert plain.trainer.trained_token_loss is None
    assert abs(ours_loss - plain_loss) < 1e-5 and abs(ours_eval - plain_eval) < 1e-5, (ours_loss, plain_loss)
    assert ours_changes.keys() == plain_changes.keys()
    for name, change in plain_changes.items():
        # every trained weight took a step (the head included), but LoRA's A: its gradient is 0 while B is 0
        assert float(change.abs().max()) > 0 or "lora_A" in name, name
        assert torch.allclose(ours_changes[name], change, atol=1e-5, rtol=1e-4), name


def test_first_batch_check_tolerates_bf16_rounding_and_catches_a_rescaled_head():
    """bf16 logits of the same product from two kernels differ by a unit of bf16 precision: no reason to fall back
    (a 1e-3 tolerance did, on QLoRA in bf16); a head output scaled after the fact is caught."""
    from finetune.training.loss import LogitsMismatch

    model = tiny_llama()
    loss, _ = TrainedTokenLoss.for_model(model, 16)
    hidden = torch.randn(2, 5, 64)
    exact = model.lm_head(hidden).detach()
    one_ulp = exact.to(torch.bfloat16) + exact.to(torch.bfloat16).abs() * 2 ** -8  # a unit of bf16 off
    loss._verify(hidden, {"logits": one_ulp})
    assert loss.verified
    loss.verified = False
    with pytest.raises(LogitsMismatch, match="differ from head"):
        loss._verify(hidden, {"logits": (exact * 0.5).to(torch.bfloat16)})
    assert not loss.verified


def test_gpu_check_fails_loudly_on_a_machine_without_a_gpu(tmp_path):
    import os
    import subprocess

    from conftest import ROOT

    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 1 and "gpu_check: FAILED: no nvidia-smi" in result.stderr
