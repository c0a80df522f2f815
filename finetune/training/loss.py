"""The training loss, computed only where it is trained.

transformers' causal-LM loss applies the output head to every position of every row, prompt and padding included,
and upcasts those full-vocabulary logits to fp32: for a 128 K vocabulary that tensor, its softmax and its gradient
are the largest allocations of a step. Here the model runs its own forward (through DDP, DeepSpeed, peft and
NEFTune exactly as before) with `logits_to_keep=1`, the decoder's last hidden states are taken from a forward hook,
and the head is applied only at the positions whose shifted label is trained, a chunk of rows at a time under
activation checkpointing, so the backward recomputes one chunk's logits at a time.

The result is the same number transformers computes: the sum of the per-token cross-entropies over trained tokens,
divided by the trained-token count of the whole optimizer step (across micro-batches and ranks) that the Trainer
passes as `num_items_in_batch`, or their mean without it. The Trainer applies its usual scaling after this
(`compute_loss_func`), so gradient accumulation and ranks average exactly as on the plain path.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)


class LogitsMismatch(RuntimeError):
    """The model's own logits are not `head(last hidden state)`: its forward transforms them (a scale, a cap) in a way
    this loss does not reproduce."""


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts label t+1; the last position of each row predicts nothing (as in ForCausalLMLoss)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                    softcap: Optional[float]) -> torch.Tensor:
    logits = head(hidden).float()  # the plain path upcasts the same way before its cross-entropy
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def _partitioned(head: torch.nn.Module) -> bool:
    """DeepSpeed ZeRO-3 parameters (`ds_id`) are gathered by module hooks and swapped back to empty shards between
    calls; the non-reentrant checkpoint compares the tensors it saved with their recomputation and refuses that
    swap (seen with offload_param), the reentrant one (DeepSpeed's own kind) re-runs the forward and does not."""
    return any(hasattr(p, "ds_id") for p in head.parameters())


def trained_token_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_size: int,
                           softcap: Optional[float] = None) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropies over the trained positions, their count); the head sees only those positions,
    `chunk_size` rows at a time, checkpointed when gradients are on."""
    targets = shifted_targets(labels).to(hidden.device)
    trained = targets != IGNORE_INDEX
    rows, wanted = hidden[trained], targets[trained]  # [N, hidden], [N]
    count = int(wanted.numel())
    if count == 0:
        # nothing trained in this micro-batch: a zero that still reaches the head and the decoder, as the plain
        # path's does, so DDP and ZeRO see every parameter used
        return _chunk_loss_sum(hidden[:, :1].flatten(0, 1), labels.new_zeros(hidden.shape[0]), head, softcap) * 0.0, 0
    total = None
    for start in range(0, count, chunk_size):
        part = (rows[start:start + chunk_size], wanted[start:start + chunk_size], head, softcap)
        if torch.is_grad_enabled():
            piece = checkpoint(_chunk_loss_sum, *part, use_reentrant=_partitioned(head))
        else:
            piece = _chunk_loss_sum(*part)
        total = piece if total is None else total + piece
    return total, count


def _chunk_token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                       softcap: Optional[float]) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return -F.cross_entropy(logits, targets, reduction="none")


def sequence_logps(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_size: int,
                   softcap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of log p(label) over its trained positions [B], their count [B]), the head applied only at
    those positions, `chunk_size` at a time and checkpointed when gradients are on (as trained_token_loss_sum).
    What preference losses compare: log pi(response | prompt) for each sequence."""
    targets = shifted_targets(labels).to(hidden.device)
    trained = targets != IGNORE_INDEX
    rows, wanted = hidden[trained], targets[trained]
    owner = trained.nonzero()[:, 0]  # the row each trained position belongs to
    total = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    if wanted.numel() == 0:  # still reach the head, so every parameter takes part (DDP, ZeRO)
        return total + _chunk_token_logps(hidden[:, :1].flatten(0, 1), labels.new_zeros(hidden.shape[0]), head,
                                          softcap) * 0.0, trained.sum(-1)
    for start in range(0, wanted.numel(), chunk_size):
        part = (rows[start:start + chunk_size], wanted[start:start + chunk_size], head, softcap)
        if torch.is_grad_enabled():
            piece = checkpoint(_chunk_token_logps, *part, use_reentrant=_partitioned(head))
        else:
            piece = _chunk_token_logps(*part)
        total = total.index_add(0, owner[start:start + chunk_size], piece)
    return total, trained.sum(-1)


def _decoder_output(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


class TrainedTokenLoss:
    """The Trainer's `compute_loss_func`: call it inside `capturing()`, around a model forward given
    `logits_to_keep=1`. The first call checks the model's own last-position logits against the head applied here,
    and raises LogitsMismatch (the Trainer then falls back) when they differ."""

    def __init__(self, decoder: torch.nn.Module, head: torch.nn.Module, chunk_size: int,
                 softcap: Optional[float] = None):
        self.decoder, self.head, self.chunk_size, self.softcap = decoder, head, chunk_size, softcap
        self.hidden: Optional[torch.Tensor] = None
        self.verified = False

    @classmethod
    def for_model(cls, model: torch.nn.Module, chunk_size: int, label_smoothing: float = 0.0
                  ) -> tuple[Optional[TrainedTokenLoss], str]:
        """The loss for this (unwrapped, possibly peft) model, or None and the reason it cannot apply."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        name = type(base).__name__
        if label_smoothing:
            return None, "--label_smoothing_factor is set (transformers' LabelSmoother needs the full logits)"
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return None, f"{name}.forward takes no logits_to_keep, so it would compute every position's logits anyway"
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        if head is None or decoder is None or decoder is base:
            return None, f"{name} has no separate decoder and output head to split the forward at"
        softcap = getattr(base.config, "final_logit_softcapping", None)
        return cls(decoder, head, chunk_size, softcap), ""

    @contextlib.contextmanager
    def capturing(self):
        def keep(_module, _inputs, output):
            self.hidden = _decoder_output(output)

        handle = self.decoder.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()
            self.hidden = None

    def _verify(self, hidden: torch.Tensor, outputs) -> None:
        """The model computed its last position's logits itself (logits_to_keep=1): ours must match them."""
        theirs = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        # the same product computed by another kernel differs by a few units of the output dtype's precision
        # (bf16: 2^-8); a scale or cap after the head differs by far more
        tolerance = max(1e-3, 4 * torch.finfo(theirs.dtype).eps)
        with torch.no_grad():
            ours = self.head(hidden[:, -1].detach()).float()  # detached: no grad hooks (FlopCounterMode) fire
            if self.softcap is not None:
                ours = torch.tanh(ours / self.softcap) * self.softcap
            theirs = theirs[:, -1].float()
            scale = max(1.0, float(theirs.abs().max()))
            difference = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("inf")
        if not difference <= tolerance * scale:
            raise LogitsMismatch(f"the model's own logits differ from head(last hidden state) by {difference:.3g}")
        self.verified = True

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        hidden = self.hidden
        if hidden is None:
            raise RuntimeError("TrainedTokenLoss was called outside capturing(): the decoder's output was not seen")
        if not self.verified:
            self._verify(hidden, outputs)
        total, count = trained_token_loss_sum(hidden, labels, self.head, self.chunk_size, self.softcap)
        if num_items_in_batch is None:
            return total / count if count else total  # mean over trained tokens, as fixed_cross_entropy's "mean"
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
