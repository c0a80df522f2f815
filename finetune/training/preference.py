"""Preference-optimization losses (--rl dpo|ipo|orpo|simpo|kto), from per-sequence log-probabilities of the trained
response tokens (loss.sequence_logps: the output head only at those positions).

Each loss is the published formula, written out here and checked against an independent computation in
tests/test_preference.py:
- DPO (Rafailov et al. 2023), with cDPO label smoothing eps: z = beta * ((pc - pr) - (rc - rr)),
  loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z); p* = the policy's summed log-probs, r* = the reference's.
- IPO (Azar et al. 2023): ((pc - pr) - (rc - rr) - 1 / (2 beta))^2, on log-probs averaged over each response's tokens
  (as TRL does; the paper's sums make the target margin depend on the response lengths).
- SimPO (Meng et al. 2024): no reference; z = beta * (mean pc - mean pr) - gamma, loss as DPO's with smoothing.
- ORPO (Hong et al. 2024): no reference; the chosen response's NLL (mean per token) minus beta * log sigmoid(log odds
  ratio), log odds(y) = mean log p(y) - log(1 - p(y)) with p(y) = exp(mean log p(y)).
- KTO (Ethayarajh et al. 2024): one response per prompt, desirable or not; with r = p - ref and the batch's reference
  point z0 = max(0, mean(p_mismatched - ref_mismatched)) (detached), desirable: w_d (1 - sigmoid(beta (r - z0))),
  undesirable: w_u (1 - sigmoid(beta (z0 - r))).
Rewards (logged): beta * (p - ref) per response; for the reference-free SimPO and ORPO, beta * mean log p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("dpo", "ipo", "orpo", "simpo", "kto")
WITH_REFERENCE = ("dpo", "ipo", "kto")  # the others compare the policy's own log-probs only


@dataclass
class Logps:
    """log pi(response | prompt) per sequence: the sum over its trained tokens and their count."""

    total: torch.Tensor  # [B] fp32
    count: torch.Tensor  # [B]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1).to(self.total.dtype)


def smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(chosen: Logps, rejected: Logps, ref_chosen: Logps, ref_rejected: Logps, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    z = beta * ((chosen.total - rejected.total) - (ref_chosen.total - ref_rejected.total))
    return smoothed_sigmoid_loss(z, label_smoothing)


def ipo_loss(chosen: Logps, rejected: Logps, ref_chosen: Logps, ref_rejected: Logps, beta: float) -> torch.Tensor:
    margin = (chosen.mean - rejected.mean) - (ref_chosen.mean - ref_rejected.mean)
    return (margin - 1 / (2 * beta)) ** 2


def simpo_loss(chosen: Logps, rejected: Logps, beta: float, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return smoothed_sigmoid_loss(beta * (chosen.mean - rejected.mean) - gamma, label_smoothing)


def orpo_loss(chosen: Logps, rejected: Logps, beta: float) -> torch.Tensor:
    def log_odds(logps: Logps) -> torch.Tensor:
        mean = logps.mean.clamp(max=-1e-6)  # p(y) < 1, so log(1 - p(y)) stays finite
        return mean - torch.log1p(-torch.exp(mean))

    return -chosen.mean - beta * F.logsigmoid(log_odds(chosen) - log_odds(rejected))


def kto_loss(policy: Logps, reference: Logps, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    ratio = policy.total - reference.total
    kl = kl.detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable.bool(), good, bad)


def rewards(policy: Logps, reference: Logps | None, beta: float) -> torch.Tensor:
    """The implicit reward of each response, detached (for the logs)."""
    if reference is None:
        return (beta * policy.mean).detach()
    return (beta * (policy.total - reference.total)).detach()


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies of a batch (TRL's names)."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
    }
