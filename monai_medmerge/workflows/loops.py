"""Two-phase merge training in plain PyTorch: coefficient learning, then fine-tuning, each with early stopping.

The MONAI-engine bundle workflow drives the same steps through Ignite; these loops are the reference the benchmarks
and the examples use, and they stay small on purpose.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.utils import optional_import
from torch import nn

from monai_medmerge.merging.norm import recalibrate_norm
from monai_medmerge.networks import KernelMerge
from monai_medmerge.workflows.metrics import classification_metrics

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["History", "split_batch", "predict", "evaluate", "fit", "learn_coefficients", "fine_tune"]


@dataclass
class History:
    """What a training phase did: per-epoch training loss and validation metrics, and the epoch kept."""

    train_loss: list[float] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("-inf")

    def as_dict(self) -> dict:
        return {"train_loss": self.train_loss, "val": self.val, "best_epoch": self.best_epoch, "best": self.best_score}


def split_batch(batch, input_key: str = "image", label_key: str = "label") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input, label)`` from a tuple/list batch or a MONAI dictionary batch.

    Raises:
        ValueError: when a dict batch lacks one of the keys.
    """
    if isinstance(batch, Mapping):
        missing = [k for k in (input_key, label_key) if k not in batch]
        if missing:
            raise ValueError(f"batch has no key(s) {missing}; its keys are {sorted(batch)}.")
        x, y = batch[input_key], batch[label_key]
    else:
        x, y = batch[0], batch[1]
    y = torch.as_tensor(y)
    return x, y.reshape(-1).long()


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels over ``loader`` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    try:
        for batch in loader:
            x, y = split_batch(batch)
            probs.append(torch.softmax(model(x.to(device)).float(), dim=1).cpu())
            labels.append(y)
    finally:
        model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> dict[str, float]:
    """Macro-F1, accuracy, balanced accuracy and AUROC of ``model`` on ``loader``."""
    probs, labels = predict(model, loader, device)
    return classification_metrics(labels, probs)


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    param_groups: list[dict],
    epochs: int,
    device: torch.device | str = "cpu",
    patience: int | None = None,
    weight_decay: float = 0.0,
    desc: str = "train",
    progress: bool = True,
    penalty: Callable[[], torch.Tensor] | None = None,
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> History:
    """Train with Adam and cross-entropy; keep the state of the best validation macro-F1 (early stopping).

    Args:
        model: the network (a :class:`KernelMerge` or a plain one), trained in training mode.
        train_loader: batches of ``(x, y)`` or dicts with ``image``/``label``.
        val_loader: validation batches; macro-F1 on them chooses the epoch that is kept.
        param_groups: Adam parameter groups (``[{"params": ..., "lr": ...}, ...]``).
        epochs: maximum number of epochs.
        device: where to train.
        patience: stop after this many epochs without improvement (``None``: run all epochs).
        weight_decay: Adam weight decay.
        desc: label of the progress bar.
        progress: show a progress bar over epochs.
        penalty: a term added to every batch's loss (a scalar tensor, e.g. a regulariser on some parameters).
        objective: the loss of one batch as ``objective(model, x, y)`` (a scalar tensor, ``x`` and ``y`` already on
            ``device``), in place of ``cross_entropy(model(x), y)``: e.g. cross-entropy plus distillation from a
            teacher. Validation still chooses by macro-F1.

    Returns:
        the :class:`History`; ``model`` holds the best epoch's state afterwards.

    Raises:
        ValueError: when ``epochs`` < 1 or no parameter is trainable.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if not any(p.requires_grad for g in param_groups for p in g["params"]):
        raise ValueError("fit: no trainable parameter in param_groups.")
    opt = torch.optim.Adam(param_groups, weight_decay=weight_decay)
    history = History()
    best_state = copy.deepcopy(model.state_dict())
    bar = tqdm(range(epochs), desc=desc, leave=False) if progress and has_tqdm else range(epochs)
    for epoch in bar:
        model.train()
        losses = []
        for batch in train_loader:
            x, y = split_batch(batch)
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(model(x), y) if objective is None else objective(model, x, y)
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.train_loss.append(float(np.mean(losses)))
        metrics = evaluate(model, val_loader, device)
        history.val.append(metrics)
        if metrics["macro_f1"] > history.best_score:
            history.best_score, history.best_epoch = metrics["macro_f1"], epoch
            best_state = copy.deepcopy(model.state_dict())
        if progress and has_tqdm:
            bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}", val_f1=f"{metrics['macro_f1']:.3f}")
        if patience is not None and epoch - history.best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return history


def learn_coefficients(
    merge: KernelMerge,
    train_loader: Iterable,
    val_loader: Iterable,
    epochs: int = 15,
    lr: float = 1e-2,
    head_lr: float = 1e-3,
    patience: int | None = 5,
    device: torch.device | str = "cpu",
    recalibrate: bool = True,
    progress: bool = True,
    anchor_penalty: float = 0.0,
) -> tuple[nn.Module, History]:
    """Phase 1: train the merge coefficients and the new head with the sources frozen, then collapse.

    The merged network normalises with batch statistics while it learns; afterwards its running statistics are
    recomputed on ``train_loader`` (``recalibrate``) and it is collapsed into a plain network. ``anchor_penalty``
    > 0 adds ``anchor_penalty * mean((logits - initial logits) ** 2)`` over the merge logits to the loss, which
    keeps the coefficients near where they started (the anchor's share, when the merge has an anchor).

    Returns:
        ``(plain network in eval mode, History)``.
    """
    head = [p for n, p in merge.named_parameters() if p.requires_grad and n != "merge_logits"]
    groups = [{"params": [merge.merge_logits], "lr": lr}]
    if head:
        groups.append({"params": head, "lr": head_lr})
    if anchor_penalty < 0:
        raise ValueError(f"anchor_penalty must be >= 0, got {anchor_penalty}.")
    merge.to(device)
    penalty = None
    if anchor_penalty > 0:
        start = merge.merge_logits.detach().clone()

        def penalty() -> torch.Tensor:
            return anchor_penalty * (merge.merge_logits - start).pow(2).mean()

    history = fit(
        merge,
        train_loader,
        val_loader,
        groups,
        epochs,
        device,
        patience,
        desc="phase 1: coefficients",
        progress=progress,
        penalty=penalty,
    )
    if recalibrate:
        recalibrate_norm(merge, train_loader, device=device)
    return merge.collapse(), history


def fine_tune(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    epochs: int = 30,
    lr: float = 1e-3,
    patience: int | None = 10,
    device: torch.device | str = "cpu",
    weight_decay: float = 0.0,
    progress: bool = True,
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[nn.Module, History]:
    """Phase 2 (and the fine-tuning baselines): train every parameter of a plain network.

    ``objective`` replaces the cross-entropy loss of a batch, as in :func:`fit`.

    Returns:
        ``(model with the best validation state, History)``.
    """
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    history = fit(
        model,
        train_loader,
        val_loader,
        [{"params": list(model.parameters()), "lr": lr}],
        epochs,
        device,
        patience,
        weight_decay,
        desc="phase 2: fine-tune",
        progress=progress,
        objective=objective,
    )
    return model.eval(), history
