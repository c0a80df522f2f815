"""The Trainer of preference optimization: one forward over each batch's chosen and rejected sequences together, their
response log-probabilities from the output head applied only at trained positions, the reference's from the same
model with its adapters disabled (LoRA / QLoRA: no second copy of the weights) or from a frozen copy (a full
fine-tune), then the loss of preference.py. rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies
are logged with the loss, and at evaluation as eval_rewards/...

Batches (PairCollator): `input_ids` / `attention_mask` / `preference_labels` of 2B rows, the B chosen sequences first,
then their B rejected ones; each row's prompt is masked (IGNORE_INDEX) and its response trained with its end token.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from finetune.training import preference
from finetune.training.loss import IGNORE_INDEX, TrainedTokenLoss, sequence_logps
from finetune.training.trainer import FinetuneTrainer, trainer_parts

if TYPE_CHECKING:
    from finetune.run_paths import RunPaths
    from train import DataArguments, TrainingArguments

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreferenceSettings:
    method: str  # one of preference.METHODS (pairs: all but kto)
    beta: float = 0.1
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    chunk_size: int = 1024  # trained positions per chunk of the output head
    chunked: bool = True  # the output head only at trained positions (False: the model's own full logits)
    precomputed_reference: bool = False  # reference log-probs come with the batches (attach_reference_logps)
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0


class PairCollator:
    """Pair rows (the prepared data of --rl: input_ids / labels of the chosen side, rejected_input_ids /
    rejected_labels) -> one padded batch of 2B rows, chosen first (right padding; labels IGNORE_INDEX on padding)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(f[f"{side}input_ids"], f[f"{side}labels"]) for side in ("", "rejected_") for f in features]
        batch = padded_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
        if REFERENCE_COLUMNS[0] in features[0]:  # --precompute_ref_log_probs
            batch["reference_logps"] = torch.tensor([f[column] for column in REFERENCE_COLUMNS for f in features],
                                                    dtype=torch.float32)
        return batch


def padded_rows(rows: list[tuple[list[int], list[int]]], pad_token_id: int, multiple: Optional[int],
                prefix: str = "") -> dict[str, torch.Tensor]:
    """(ids, labels) rows -> right-padded input_ids / attention_mask / preference_labels (IGNORE_INDEX on padding)."""
    length = max(len(ids) for ids, _ in rows)
    if multiple:
        length = -(-length // multiple) * multiple
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (row_ids, row_labels) in enumerate(rows):
        ids[row, :len(row_ids)] = torch.tensor(row_ids)
        labels[row, :len(row_labels)] = torch.tensor(row_labels)
        mask[row, :len(row_ids)] = 1
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}preference_labels": labels}


class UnpairedCollator:
    """KTO rows (input_ids, labels, kto_label) -> the B samples, and B mismatched ones for the KL reference point:
    sample i's prompt with sample i+1's answer (kl_* tensors, cut to `max_length`), and `kto_desirable`."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None, max_length: int = 2048):
        self.pad_token_id, self.pad_to_multiple_of, self.max_length = pad_token_id, pad_to_multiple_of, max_length

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(f["input_ids"], f["labels"]) for f in features]
        starts = [next(i for i, label in enumerate(labels) if label != IGNORE_INDEX) for _, labels in rows]
        mismatched = []
        for i, ((ids, _), start) in enumerate(zip(rows, starts)):
            j = (i + 1) % len(rows)
            other_ids, other_labels = rows[j]
            mismatched.append(((ids[:start] + other_ids[starts[j]:])[:self.max_length],
                               ([IGNORE_INDEX] * start + other_labels[starts[j]:])[:self.max_length]))
        return (padded_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
                | padded_rows(mismatched, self.pad_token_id, self.pad_to_multiple_of, prefix="kl_")
                | {"kto_desirable": torch.tensor([bool(f["kto_label"]) for f in features])})


REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")


class PreferenceTrainer(FinetuneTrainer):
    def __init__(self, *args, preference_settings: PreferenceSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = preference_settings
        if preference_settings.method not in preference.METHODS:
            raise ValueError(f"PreferenceTrainer trains one of {preference.METHODS}, not {preference_settings.method!r}")
        self.loss_is_scaled_for_ga = False  # a mean over the micro-batch's pairs: the Trainer divides by accumulation
        self.head_split = None
        if preference_settings.chunked:
            self.head_split, why_not = TrainedTokenLoss.for_model(self.model, preference_settings.chunk_size)
            if self.head_split is None:
                logger.info("Preference log-probs from the model's full logits: %s", why_not)
        self.reference_model = None
        if (preference_settings.method in preference.WITH_REFERENCE and not hasattr(self.model, "disable_adapter")
                and not preference_settings.precomputed_reference):
            # a full fine-tune: the reference is a frozen copy of the starting weights
            self.reference_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.pending: dict[str, list[dict[str, float]]] = {"train": [], "eval": []}

    # --- log-probabilities ----------------------------------------------------------------------------------------

    def response_logps(self, model, inputs: dict, head_split: Optional[TrainedTokenLoss]) -> preference.Logps:
        labels = inputs["preference_labels"]
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if head_split is None:  # the model's own full logits
            logits = model(**forward).logits.float()
            targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            trained = targets != IGNORE_INDEX
            logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            return preference.Logps((logp * trained).sum(-1), trained.sum(-1))
        with head_split.capturing():
            model(**forward, logits_to_keep=1)
            total, count = sequence_logps(head_split.hidden, labels, head_split.head, self.settings.chunk_size,
                                          head_split.softcap)
        return preference.Logps(total, count)

    def reference_logps(self, model, inputs: dict) -> preference.Logps:
        """The reference's log-probs: a frozen copy, the model with its adapters off, or (only while precomputing,
        before any step) the full fine-tune's model itself."""
        with torch.no_grad():
            if self.reference_model is not None:
                split = TrainedTokenLoss.for_model(self.reference_model, self.settings.chunk_size)[0] \
                    if self.head_split is not None else None
                return self.response_logps(self.reference_model, inputs, split)
            unwrapped = self.accelerator.unwrap_model(model)
            with unwrapped.disable_adapter() if hasattr(unwrapped, "disable_adapter") else contextlib.nullcontext():
                return self.response_logps(model, inputs, self.head_split)

    # --- the loss -------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.settings.method == "kto":
            return self.kto_loss(model, inputs, return_outputs)
        policy = self.response_logps(model, inputs, self.head_split)
        pairs = policy.total.shape[0] // 2
        chosen, rejected = (preference.Logps(policy.total[s], policy.count[s])
                            for s in (slice(0, pairs), slice(pairs, None)))
        settings, method = self.settings, self.settings.method
        ref_chosen = ref_rejected = None
        if method in preference.WITH_REFERENCE:
            if "reference_logps" in inputs:
                reference = preference.Logps(inputs["reference_logps"].to(policy.total.dtype), policy.count)
            elif self.settings.precomputed_reference and not hasattr(self.accelerator.unwrap_model(model), "disable_adapter"):
                raise RuntimeError("--precompute_ref_log_probs: a batch came without its reference log-probs")
            else:
                reference = self.reference_logps(model, inputs)
            ref_chosen, ref_rejected = (preference.Logps(reference.total[s], reference.count[s])
                                        for s in (slice(0, pairs), slice(pairs, None)))
        if method == "dpo":
            losses = preference.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, settings.beta,
                                         settings.label_smoothing)
        elif method == "ipo":
            losses = preference.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, settings.beta)
        elif method == "simpo":
            losses = preference.simpo_loss(chosen, rejected, settings.beta, settings.simpo_gamma,
                                           settings.label_smoothing)
        else:
            losses = preference.orpo_loss(chosen, rejected, settings.beta)
        metrics = preference.pair_metrics(preference.rewards(chosen, ref_chosen, settings.beta),
                                          preference.rewards(rejected, ref_rejected, settings.beta))
        metrics["logps/chosen"] = chosen.total.detach().mean().item()
        metrics["logps/rejected"] = rejected.total.detach().mean().item()
        self.pending["train" if model.training else "eval"].append(metrics)
        loss = losses.mean()
        return (loss, {"loss": loss}) if return_outputs else loss

    def kto_loss(self, model, inputs, return_outputs=False):
        """KTO: each answer's reward against the batch's KL reference point, measured (without gradients) on the
        mismatched prompt/answer rows, as TRL's KTOTrainer does."""
        settings = self.settings
        kl_inputs = {key.removeprefix("kl_"): value for key, value in inputs.items() if key.startswith("kl_")}
        policy = self.response_logps(model, inputs, self.head_split)
        with torch.no_grad():
            policy_kl = self.response_logps(model, kl_inputs, self.head_split)
        reference, reference_kl = self.reference_logps(model, inputs), self.reference_logps(model, kl_inputs)
        kl = (policy_kl.total - reference_kl.total).mean()
        desirable = inputs["kto_desirable"]
        losses = preference.kto_loss(policy, reference, desirable, kl, settings.beta, settings.desirable_weight,
                                     settings.undesirable_weight)
        rewards = preference.rewards(policy, reference, settings.beta)
        metrics = {"kl": kl.clamp(min=0).item()}
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):  # TRL's names: desirable / undesirable
            metrics[f"rewards/{name}|sum"] = rewards[rows].sum().item()
            metrics[f"logps/{name}|sum"] = policy.total.detach()[rows].sum().item()
            metrics[f"rewards/{name}|count"] = metrics[f"logps/{name}|count"] = float(rows.sum().item())
        self.pending["train" if model.training else "eval"].append(metrics)
        loss = losses.mean()
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None

    def attach_reference_logps(self, dataset, cache: str):
        """--precompute_ref_log_probs: the dataset with each pair's reference log-probs as two columns, read from
        `cache` (a .npz) when a run already computed them, else computed now (before any step, so a full fine-tune's
        model is still the reference) in dataset order by every rank alike, and written by rank 0."""
        import numpy as np

        if os.path.isfile(cache):
            with np.load(cache) as stored:
                values = [stored[column] for column in REFERENCE_COLUMNS]
            if all(len(v) == len(dataset) for v in values):
                logger.info("reference log-probs of %d pairs read from %s", len(dataset), cache)
                return self.with_reference_columns(dataset, values)
        started, model = time.monotonic(), self.model
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        size = self.args.per_device_eval_batch_size
        for start in range(0, len(dataset), size):
            rows = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
            batch = {k: v.to(self.args.device) for k, v in PairCollator(self.processing_class.pad_token_id)(rows).items()}
            logps = self.reference_logps(model, batch).total.float().cpu()
            chosen += logps[:len(rows)].tolist()
            rejected += logps[len(rows):].tolist()
        model.train(was_training)
        values = [np.array(chosen, dtype=np.float32), np.array(rejected, dtype=np.float32)]
        if self.args.process_index == 0:
            partial = f"{cache}.tmp-{os.getpid()}.npz"
            np.savez(partial, **dict(zip(REFERENCE_COLUMNS, values)))
            os.replace(partial, cache)
        logger.info("reference log-probs of %d pairs computed in %.1f s, stored in %s", len(dataset),
                    time.monotonic() - started, cache)
        return self.with_reference_columns(dataset, values)

    @staticmethod
    def with_reference_columns(dataset, values):
        for column, value in zip(REFERENCE_COLUMNS, values):
            dataset = dataset.add_column(column, value.tolist())
        return dataset

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        kind = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        pending = self.pending[kind]
        if pending and ("loss" in logs or kind == "eval"):
            prefix = "eval_" if kind == "eval" else ""
            keys = list(pending[0])
            means = torch.tensor([sum(m[key] for m in pending) / len(pending) for key in keys], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # every rank logs at the same steps: the metrics of all ranks' batches, as the loss is
                means = means.to(self.args.device)  # NCCL reduces on the GPU
                torch.distributed.all_reduce(means)
                means = means.cpu() / torch.distributed.get_world_size()
            values = dict(zip(keys, means.tolist()))
            for key, value in values.items():
                if key.endswith("|sum"):  # a mean over the rows that have it (KTO: desirable / undesirable rows)
                    count = values[key.replace("|sum", "|count")]
                    if count:
                        logs[prefix + key.removesuffix("|sum")] = round(value / count, 6)
                elif not key.endswith("|count"):
                    logs[prefix + key] = round(value, 6)
            pending.clear()
        super().log(logs, start_time)


def build_preference_trainer(model, args: TrainingArguments, paths: RunPaths, data_args: DataArguments, tokenizer,
                             train, evaluation, gen_config=None) -> PreferenceTrainer:
    """The Trainer of --rl: pair batches, the method's loss, every other part as an SFT run's."""
    settings = PreferenceSettings(data_args.rl, beta=args.rl_beta, simpo_gamma=args.simpo_gamma,
                                  label_smoothing=args.label_smoothing, chunk_size=args.cross_entropy_chunk_size,
                                  chunked=args.chunked_cross_entropy,
                                  precomputed_reference=args.precompute_ref_log_probs,
                                  desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)
    logger.info("Preference optimization: --rl %s, beta %g%s; reference: %s", settings.method, settings.beta,
                f", gamma {settings.simpo_gamma:g}" if settings.method == "simpo" else "",
                "none (the method compares the policy's own log-probs)" if settings.method not in preference.WITH_REFERENCE
                else ("precomputed from " if settings.precomputed_reference else "")
                + ("the base with the adapters disabled" if hasattr(model, "disable_adapter") else
                   "the starting model" if settings.precomputed_reference else "a frozen copy of the model"))
    collator = (UnpairedCollator(tokenizer.pad_token_id, data_args.pad_to_multiple_of, data_args.model_max_len)
                if settings.method == "kto" else PairCollator(tokenizer.pad_token_id, data_args.pad_to_multiple_of))
    trainer = PreferenceTrainer(data_collator=collator,
                                preference_settings=settings,
                                **trainer_parts(model, args, paths, tokenizer, train, evaluation, gen_config))
    if settings.precomputed_reference:
        key = reference_key(model, args, paths)
        trainer.train_dataset = trainer.attach_reference_logps(
            trainer.train_dataset, os.path.join(paths.prepared, f"reference_logps-train-{key}.npz"))
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = trainer.attach_reference_logps(
                trainer.eval_dataset, os.path.join(paths.prepared, f"reference_logps-eval-{key}.npz"))
    return trainer


def reference_key(model, args: TrainingArguments, paths: RunPaths) -> str:
    """What the reference log-probs depend on: the prepared data (its fingerprint) and the reference weights (the
    base model as loaded: path, bits, quantization)."""
    with open(os.path.join(paths.prepared, "stats.json")) as handle:
        data = json.load(handle)["fingerprint"]
    base = getattr(model, "get_base_model", lambda: model)()
    settings = [data, base.config._name_or_path, args.bits, args.quant_type, args.double_quant, args.full_finetune]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
