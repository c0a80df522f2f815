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
import logging
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


class PairCollator:
    """Pair rows (the prepared data of --rl: input_ids / labels of the chosen side, rejected_input_ids /
    rejected_labels) -> one padded batch of 2B rows, chosen first (right padding; labels IGNORE_INDEX on padding)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(f[f"{side}input_ids"], f[f"{side}labels"]) for side in ("", "rejected_") for f in features]
        length = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(rows):
            ids[row, :len(row_ids)] = torch.tensor(row_ids)
            labels[row, :len(row_labels)] = torch.tensor(row_labels)
            mask[row, :len(row_ids)] = 1
        return {"input_ids": ids, "attention_mask": mask, "preference_labels": labels}


class PreferenceTrainer(FinetuneTrainer):
    def __init__(self, *args, preference_settings: PreferenceSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = preference_settings
        if preference_settings.method not in preference.METHODS or preference_settings.method == "kto":
            raise ValueError(f"PreferenceTrainer trains pairs with one of {preference.METHODS[:-1]}, "
                             f"not {preference_settings.method!r}")
        self.loss_is_scaled_for_ga = False  # a mean over the micro-batch's pairs: the Trainer divides by accumulation
        self.head_split = None
        if preference_settings.chunked:
            self.head_split, why_not = TrainedTokenLoss.for_model(self.model, preference_settings.chunk_size)
            if self.head_split is None:
                logger.info("Preference log-probs from the model's full logits: %s", why_not)
        self.reference_model = None
        if preference_settings.method in preference.WITH_REFERENCE and not hasattr(self.model, "disable_adapter"):
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
        policy = self.response_logps(model, inputs, self.head_split)
        pairs = policy.total.shape[0] // 2
        chosen, rejected = (preference.Logps(policy.total[s], policy.count[s])
                            for s in (slice(0, pairs), slice(pairs, None)))
        settings, method = self.settings, self.settings.method
        ref_chosen = ref_rejected = None
        if method in preference.WITH_REFERENCE:
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

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None

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
            for key, value in zip(keys, means.tolist()):
                logs[prefix + key] = round(value, 6)
            pending.clear()
        super().log(logs, start_time)


def build_preference_trainer(model, args: TrainingArguments, paths: RunPaths, data_args: DataArguments, tokenizer,
                             train, evaluation, gen_config=None) -> PreferenceTrainer:
    """The Trainer of --rl: pair batches, the method's loss, every other part as an SFT run's."""
    settings = PreferenceSettings(data_args.rl, beta=args.rl_beta, simpo_gamma=args.simpo_gamma,
                                  label_smoothing=args.label_smoothing, chunk_size=args.cross_entropy_chunk_size,
                                  chunked=args.chunked_cross_entropy)
    logger.info("Preference optimization: --rl %s, beta %g%s; reference: %s", settings.method, settings.beta,
                f", gamma {settings.simpo_gamma:g}" if settings.method == "simpo" else "",
                "none (the method compares the policy's own log-probs)" if settings.method not in preference.WITH_REFERENCE
                else "the base with the adapters disabled" if hasattr(model, "disable_adapter") else "a frozen copy of the model")
    return PreferenceTrainer(data_collator=PairCollator(tokenizer.pad_token_id, data_args.pad_to_multiple_of),
                             preference_settings=settings,
                             **trainer_parts(model, args, paths, tokenizer, train, evaluation, gen_config))
