"""finetune/training/preference.py and loss.sequence_logps: each preference loss and its gradient on a fixed batch equal
the published formula computed independently here (plain Python floats for the values, float64 autograd of a
direct transcription for the gradients), within 1e-5 in fp32."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.training import preference
from finetune.training.loss import IGNORE_INDEX, sequence_logps

BETA, GAMMA, SMOOTH = 0.1, 0.5, 0.1


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def fixed_batch(seed: int = 0):
    """Four pairs: policy and reference summed log-probs and token counts for chosen and rejected."""
    g = torch.Generator().manual_seed(seed)
    counts_c, counts_r = torch.tensor([3, 5, 2, 7]), torch.tensor([4, 4, 6, 1])
    tensors = {name: -(torch.rand(4, generator=g) * 6 + 0.5) * counts for name, counts in
               (("pc", counts_c), ("pr", counts_r), ("rc", counts_c), ("rr", counts_r))}
    return tensors, counts_c, counts_r


def expected(method: str, v: dict, i: int) -> float:
    """The paper's formula for pair i, in floats."""
    pc, pr, rc, rr = (float(v[k][i]) for k in ("pc", "pr", "rc", "rr"))
    nc, nr = float(v["nc"][i]), float(v["nr"][i])
    if method == "dpo":
        z = BETA * ((pc - pr) - (rc - rr))
        return -(1 - SMOOTH) * log_sigmoid(z) - SMOOTH * log_sigmoid(-z)
    if method == "ipo":
        return ((pc / nc - pr / nr) - (rc / nc - rr / nr) - 1 / (2 * BETA)) ** 2
    if method == "simpo":
        z = BETA * (pc / nc - pr / nr) - GAMMA
        return -(1 - SMOOTH) * log_sigmoid(z) - SMOOTH * log_sigmoid(-z)
    if method == "orpo":
        odds = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731
        return -pc / nc - BETA * log_sigmoid(odds(pc / nc) - odds(pr / nr))
    raise AssertionError(method)


def ours(method: str, v: dict) -> torch.Tensor:
    c, r = preference.Logps(v["pc"], v["nc"]), preference.Logps(v["pr"], v["nr"])
    rc, rr = preference.Logps(v["rc"], v["nc"]), preference.Logps(v["rr"], v["nr"])
    if method == "dpo":
        return preference.dpo_loss(c, r, rc, rr, BETA, SMOOTH)
    if method == "ipo":
        return preference.ipo_loss(c, r, rc, rr, BETA)
    if method == "simpo":
        return preference.simpo_loss(c, r, BETA, GAMMA, SMOOTH)
    return preference.orpo_loss(c, r, BETA)


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo"])
def test_pair_losses_and_gradients_equal_the_published_formulas(method):
    tensors, nc, nr = fixed_batch()
    values = {**tensors, "nc": nc, "nr": nr}
    leaves = {k: tensors[k].clone().requires_grad_(True) for k in ("pc", "pr")}
    loss = ours(method, {**values, **leaves})
    assert loss.shape == (4,) and loss.dtype == torch.float32
    for i in range(4):
        assert loss[i].item() == pytest.approx(expected(method, values, i), abs=1e-5)
    loss.mean().backward()
    # the gradient of a direct float64 transcription of the formula, for the same batch
    for k in ("pc", "pr"):
        for i in range(4):
            shifted = []
            for step in (1e-4, -1e-4):
                moved = {**values, k: values[k].double().clone()}
                moved[k][i] += step
                shifted.append(sum(expected(method, moved, j) for j in range(4)) / 4)
            numeric = (shifted[0] - shifted[1]) / 2e-4
            assert leaves[k].grad[i].item() == pytest.approx(numeric, abs=1e-5), (k, i)


def test_kto_loss_and_gradient_equal_the_formula():
    g = torch.Generator().manual_seed(1)
    policy, reference = -torch.rand(6, generator=g) * 20, -torch.rand(6, generator=g) * 20
    mismatched_policy, mismatched_reference = -torch.rand(6, generator=g) * 20, -torch.rand(6, generator=g) * 20
    desirable = torch.tensor([1, 0, 1, 1, 0, 0])
    counts = torch.ones(6, dtype=torch.long)
    kl = (mismatched_policy - mismatched_reference).mean()
    leaf = policy.clone().requires_grad_(True)
    loss = preference.kto_loss(preference.Logps(leaf, counts), preference.Logps(reference, counts), desirable, kl,
                               BETA, desirable_weight=1.5, undesirable_weight=0.7)
    z0 = max(0.0, float(kl))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i in range(6):
        r = float(policy[i] - reference[i])
        want = 1.5 * (1 - sigmoid(BETA * (r - z0))) if desirable[i] else 0.7 * (1 - sigmoid(BETA * (z0 - r)))
        assert loss[i].item() == pytest.approx(want, abs=1e-6)
    loss.sum().backward()
    for i in range(6):
        r = float(policy[i] - reference[i])
        s = sigmoid(BETA * (r - z0)) if desirable[i] else sigmoid(BETA * (z0 - r))
        want = -1.5 * BETA * s * (1 - s) if desirable[i] else 0.7 * BETA * s * (1 - s)
        assert leaf.grad[i].item() == pytest.approx(want, abs=1e-6)


def test_rewards_and_metrics():
    tensors, nc, nr = fixed_batch()
    chosen = preference.rewards(preference.Logps(tensors["pc"], nc), preference.Logps(tensors["rc"], nc), BETA)
    rejected = preference.rewards(preference.Logps(tensors["pr"], nr), preference.Logps(tensors["rr"], nr), BETA)
    assert torch.allclose(chosen, BETA * (tensors["pc"] - tensors["rc"]))
    metrics = preference.pair_metrics(chosen, rejected)
    assert metrics["rewards/margins"] == pytest.approx((chosen - rejected).mean().item())
    assert metrics["rewards/accuracies"] == pytest.approx((chosen > rejected).float().mean().item())
    free = preference.rewards(preference.Logps(tensors["pc"], nc), None, BETA)
    assert torch.allclose(free, BETA * tensors["pc"] / nc)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_sequence_logps_equal_the_full_log_softmax_at_trained_positions(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 11, bias=False)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, :] = IGNORE_INDEX  # nothing trained in this row
    labels[2, 5:] = IGNORE_INDEX  # padding
    total, count = sequence_logps(hidden, labels, head, chunk)
    logp = torch.log_softmax(head(hidden).float(), -1)[:, :-1]
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    want = (logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)
    assert count.tolist() == mask.sum(-1).tolist() == [4, 0, 4]
    assert torch.allclose(total, want, atol=1e-5)
    grad_ours = torch.autograd.grad(total.sum(), hidden)[0]
    grad_want = torch.autograd.grad(want.sum(), hidden)[0]
    assert torch.allclose(grad_ours, grad_want, atol=1e-5)
