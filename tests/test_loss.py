import pytest
import torch
import torch.nn.functional as F

from lm.loss import _HeadCrossEntropy, head_cross_entropy
from lm.model import GPT
from tests.test_model import tiny


def plain_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, fused: bool):
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = (_HeadCrossEntropy.apply(hidden, weight, targets) if fused
            else F.cross_entropy(F.linear(hidden, weight), targets))
    (loss * 3.0).backward()  # an upstream gradient other than 1 must scale both gradients
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("kernel", ["onednn", "default"])  # the products by either of lm/linear.py's kernels
def test_fused_head_cross_entropy_matches_the_plain_formula(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LM_CPU_MATMUL", kernel)
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=generator), torch.randn(53, 16, generator=generator)
    targets = torch.randint(0, 53, (37,), generator=generator)
    targets[:5] = 7  # repeated targets: each row's one is subtracted once, in its own row
    fused, plain = (plain_loss_and_grads(hidden, weight, targets, fused) for fused in (True, False))
    for got, expected in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_model_loss_and_gradients_are_those_of_the_plain_formula() -> None:
    """The fused path inside GPT.forward, with the output head tied to the embedding (two gradient uses)."""
    torch.manual_seed(0)
    model = GPT(tiny())
    ids, targets = torch.randint(0, 97, (2, 3, 24))
    _, loss = model(ids, targets)
    loss.backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(ids)
    plain = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    plain.backward()
    torch.testing.assert_close(loss, plain)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_without_gradients_the_plain_formula_runs() -> None:
    hidden, weight, targets = torch.randn(4, 8), torch.randn(11, 8), torch.tensor([0, 3, 10, 3])
    with torch.no_grad():
        loss = head_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets))
