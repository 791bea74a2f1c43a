"""Two-phase merge training from Python: thin calls of the engines the training bundle runs.

:func:`fit` builds a phase with :func:`~monai_medmerge.workflows.engines.phase_evaluator` and
:func:`~monai_medmerge.workflows.engines.phase_trainer` (the functions ``configs/train.yaml`` instantiates), runs it
and returns what it did. :func:`learn_coefficients` is phase 1 (coefficients and new head, sources frozen, then norm
recalibration and collapse, as the bundle's ``collapsed`` id does), :func:`fine_tune` is phase 2 and every
fine-tuning baseline. Adam, cross-entropy, the state of the best validation macro-F1 kept, early stopping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.engines import default_prepare_batch
from monai.utils import optional_import
from torch import nn

from monai_medmerge.networks import KernelMerge
from monai_medmerge.workflows import engines
from monai_medmerge.workflows.metrics import classification_metrics

Events, _ = optional_import("ignite.engine", name="Events")

__all__ = ["History", "evaluate", "fine_tune", "fit", "learn_coefficients", "linear_probe", "predict"]


@dataclass
class History:
    """What a training phase did: per-epoch training loss and validation metrics, and the epoch kept (0-based)."""

    train_loss: list[float] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("-inf")

    def as_dict(self) -> dict:
        return {"train_loss": self.train_loss, "val": self.val, "best_epoch": self.best_epoch, "best": self.best_score}


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels over ``loader`` in eval mode (the model's mode is restored).

    Batches are dicts with ``image``/``label`` or ``(image, label)`` pairs, as the engines read them.
    """
    was_training = model.training
    model.eval()
    probs, labels = [], []
    try:
        for batch in loader:
            x, y = default_prepare_batch(batch, device)
            probs.append(torch.softmax(model(x).float(), dim=1).cpu())
            labels.append(torch.as_tensor(y).reshape(-1).cpu())
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
    loss_function: Callable | None = None,
    task: str = "classification",
    num_classes: int | None = None,
    inferer: Any = None,
    prepare_batch: Callable | None = None,
    epoch_length: int | None = None,
) -> History:
    """Train with Adam on the bundle's engines; keep the state of the best validation key metric (macro-F1, or
    mean Dice for segmentation; early stopping).

    Args:
        model: the network (a :class:`KernelMerge` or a plain one).
        train_loader: batches of ``(x, y)`` or dicts with ``image``/``label``.
        val_loader: validation batches; macro-F1 on them chooses the epoch that is kept.
        param_groups: Adam parameter groups (``[{"params": ..., "lr": ...}, ...]``).
        epochs: maximum number of epochs.
        device: where to train.
        patience: stop after this many epochs without improvement (``None``: run all epochs).
        weight_decay: Adam weight decay.
        desc: label of the progress bar: what is trained.
        progress: show a progress bar.
        loss_function: ``loss(pred, label)`` of a batch, the trainer's loss (default: the task's,
            :func:`~monai_medmerge.workflows.engines.default_loss`).
        task: ``"classification"`` or ``"segmentation"`` (label maps; validation by mean Dice).
        num_classes: classes of the task (needed for segmentation: labels, background included).
        inferer: the validation inferer (e.g. a ``SlidingWindowInferer`` for whole images).
        prepare_batch: how the trainer reads a training batch (default MONAI's; a distillation's adds images,
            :class:`~monai_medmerge.workflows.distillation.EnsembleDistillation`).
        epoch_length: training steps per epoch (``None``: one pass over ``train_loader``).

    Returns:
        the :class:`History`; ``model`` holds the best epoch's state afterwards.

    Raises:
        ValueError: when ``epochs`` < 1 or no parameter is trainable.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    param_groups = [dict(g, params=list(g["params"])) for g in param_groups]
    if not any(p.requires_grad for g in param_groups for p in g["params"]):
        raise ValueError("fit: no trainable parameter in param_groups.")
    model.to(device)
    optimizer = torch.optim.Adam(param_groups, weight_decay=weight_decay)
    evaluator = engines.phase_evaluator(
        model, val_loader, device=device, num_classes=num_classes, inferer=inferer, task=task
    )
    if loss_function is None:
        loss_function = engines.default_loss(task)
    trainer = engines.phase_trainer(
        model,
        train_loader,
        evaluator,
        optimizer,
        epochs,
        device=device,
        loss_function=loss_function,
        patience=patience,
        progress=progress,
        desc=desc,
        prepare_batch=prepare_batch or default_prepare_batch,
        epoch_length=epoch_length,
    )
    history = History()
    losses: list[float] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"].detach()))
    )

    def end_of_epoch(_engine) -> None:
        history.train_loss.append(float(np.mean(losses)))
        losses.clear()

    def validated(engine) -> None:
        history.val.append({k.removeprefix("val_"): float(v) for k, v in engine.state.metrics.items()})

    # registered after the phase's own handlers: the loss is recorded first, then validation reports
    trainer.add_event_handler(Events.EPOCH_COMPLETED, end_of_epoch)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, validated)
    trainer.run()
    history.best_epoch = int(evaluator.state.best_metric_epoch) - 1
    history.best_score = float(evaluator.state.best_metric)
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
    desc: str = "phase 1: coefficients",
    loss_function: Callable | None = None,
    **task_args: Any,
) -> tuple[nn.Module, History]:
    """Phase 1: train the merge coefficients (at ``lr``) and the new head (at ``head_lr``) with the sources frozen,
    then collapse into a plain network with its norm statistics recomputed on ``train_loader`` (``recalibrate``).

    The merged network normalises with batch statistics while it learns. ``merge`` keeps its best state.
    ``task_args`` go to :func:`fit`: ``task="segmentation"`` with ``num_classes`` (and an ``inferer``) for label maps.

    Returns:
        ``(plain network in eval mode, History)``.
    """
    merge.to(device)
    groups = engines.merge_parameter_groups(merge, lr, head_lr)
    history = fit(
        merge,
        train_loader,
        val_loader,
        groups,
        epochs,
        device,
        patience,
        desc=desc,
        progress=progress,
        loss_function=loss_function,
        **task_args,
    )
    plain = engines.collapse_merge(merge, None, train_loader if recalibrate else None, device=device)
    return plain.eval(), history


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
    desc: str = "phase 2: fine-tune",
    loss_function: Callable | None = None,
    **task_args: Any,
) -> tuple[nn.Module, History]:
    """Phase 2 (and the fine-tuning baselines): train every parameter of a plain network. ``task_args`` go to
    :func:`fit` (``task``, ``num_classes``, ``inferer``, ``prepare_batch``, ``epoch_length``; distilled from an
    ensemble: :func:`~monai_medmerge.workflows.distillation.fine_tune_distilled`).

    Returns:
        ``(model with the best validation state, in eval mode, History)``.
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
        desc=desc,
        progress=progress,
        loss_function=loss_function,
        **task_args,
    )
    return model.eval(), history


class _HeadOnly(nn.Module):
    """``net`` with its body held in eval mode (its norm statistics do not move) and only the ``heads`` following
    the training mode: the model a linear probe trains."""

    def __init__(self, net: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.net, self.heads = net, nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        for head in self.heads:
            head.train(self.training)
        return self.net(x)


def linear_probe(
    model: nn.Module,
    head: str | Sequence[str],
    train_loader: Iterable,
    val_loader: Iterable,
    epochs: int = 10,
    lr: float = 1e-2,
    patience: int | None = 10,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "linear probe: the new head",
    loss_function: Callable | None = None,
    **task_args: Any,
) -> History:
    """Train only the module ``head`` of ``model`` (or the modules, given several names: a head and its
    deep-supervision heads) on its frozen body, the body in eval mode so that its norm statistics stay as they
    were: the first half of LP-FT, a new head trained before a fine-tuning moves the body, so that a random head's
    first gradients do not disturb the pretrained features. With few labels per class this head-first schedule
    fine-tunes better than a fine-tuning from a random head (docs/benchmarks.md, the LP-FT rows).

    ``model`` keeps the best validation state; every parameter's ``requires_grad`` is as it was afterwards.
    ``task_args`` go to :func:`fit`.

    Raises:
        ValueError: when a name in ``head`` is not a module of ``model``, or the heads have no parameter.
    """
    names = [head] if isinstance(head, str) else list(head)
    modules = []
    for name in names:
        try:
            modules.append(model.get_submodule(name))
        except AttributeError as err:
            raise ValueError(f"linear_probe: the network has no module {name!r} to train as its head.") from err
    params = [p for m in modules for p in m.parameters()]
    if not params:
        raise ValueError(f"linear_probe: the head module(s) {names} have no parameter to train.")
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        return fit(
            _HeadOnly(model, modules),
            train_loader,
            val_loader,
            [{"params": params, "lr": lr}],
            epochs,
            device,
            patience,
            desc=desc,
            progress=progress,
            loss_function=loss_function,
            **task_args,
        )
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
