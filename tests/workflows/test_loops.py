"""The plain two-phase loops: the extra loss term and the custom objective of ``fit``, the anchor penalty of phase 1."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from monai_medmerge.networks import KernelMerge
from monai_medmerge.workflows.loops import fine_tune, fit, learn_coefficients
from monai_medmerge.workflows.transfer import HEAD, Recipe, build_network

RECIPE = Recipe(widths=(4, 8, 8, 8))


def _loader(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(48) % 3
    x = torch.randn(48, 1, 16, 16, generator=g) + y.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _merge() -> KernelMerge:
    torch.manual_seed(0)
    sources = [build_network(2, RECIPE), build_network(5, RECIPE)]
    return KernelMerge(sources, head=HEAD, out_channels=3, anchor=1, anchor_weight=0.9)


def test_fit_adds_the_penalty_to_the_loss():
    losses = {}
    for extra in (0.0, 5.0):
        torch.manual_seed(0)
        net = build_network(3, RECIPE)
        # lr 0: the weights stay put, so the two runs see the same cross-entropy
        history = fit(
            net,
            _loader(),
            _loader(),
            [{"params": list(net.parameters()), "lr": 0.0}],
            epochs=1,
            progress=False,
            penalty=(lambda e=extra: torch.tensor(e)) if extra else None,
        )
        losses[extra] = history.train_loss[0]
    assert losses[5.0] == pytest.approx(losses[0.0] + 5.0, abs=1e-4)


def test_objective_replaces_the_cross_entropy():
    seen = []

    def towards_class_two(model, x, y):
        # ignores the labels: every batch is scored against class 2
        seen.append((x.shape[0], y.shape[0]))
        return torch.nn.functional.cross_entropy(model(x), torch.full_like(y, 2))

    torch.manual_seed(0)
    net = build_network(3, RECIPE)
    x, y = _loader().dataset.tensors
    with torch.no_grad():
        net.train()
        # per batch of 16, as the loop computes it (training mode: batch statistics)
        expected = {
            "objective": torch.stack(
                [torch.nn.functional.cross_entropy(net(b), torch.full((16,), 2)) for b in x.split(16)]
            ),
            "cross-entropy": torch.stack(
                [torch.nn.functional.cross_entropy(net(b), t) for b, t in zip(x.split(16), y.split(16), strict=True)]
            ),
        }
    # lr 0: the weights stay put, so the recorded loss is the objective's on the starting weights
    _, history = fine_tune(net, _loader(), _loader(), epochs=1, lr=0.0, progress=False, objective=towards_class_two)
    assert seen == [(16, 16)] * 3  # every batch went through the objective
    assert history.train_loss[0] == pytest.approx(expected["objective"].mean().item(), abs=1e-5)
    assert abs(expected["objective"].mean() - expected["cross-entropy"].mean()) > 1e-3  # the two losses differ


def test_anchor_penalty_keeps_coefficients_near_their_start():
    moved = {}
    for weight in (0.0, 1000.0):
        merge = _merge()
        start = merge.merge_logits.detach().clone()
        torch.manual_seed(1)
        learn_coefficients(
            merge, _loader(), _loader(), epochs=6, lr=0.05, patience=None, progress=False, anchor_penalty=weight
        )
        moved[weight] = (merge.merge_logits.detach() - start).abs().mean().item()
    assert moved[0.0] > 0.01, f"without a penalty the logits should move, moved {moved[0.0]:.4f}"
    assert moved[1000.0] < 0.25 * moved[0.0], moved  # Adam still jitters by about lr around the start


def test_negative_anchor_penalty_is_an_error():
    with pytest.raises(ValueError, match="anchor_penalty"):
        learn_coefficients(_merge(), _loader(), _loader(), epochs=1, progress=False, anchor_penalty=-1.0)
