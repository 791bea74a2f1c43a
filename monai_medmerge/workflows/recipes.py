"""The two recipes of a merge run, and phase 0 of the paper's.

- ``direct``: phase 1 merges the sources as they come (each with its own task's head, replaced by a new one).
- ``paper``: phase 0 first fine-tunes each source on the target (a new head each, every parameter trained, early
  stopping on validation, as the single-source baselines are); phase 1 then merges the fine-tuned networks, their
  target heads included, and phase 2 fine-tunes the collapsed network. This is the setting of the MedMerge paper's
  experiments (see docs/method.md); it costs N fine-tunings more than ``direct``.

Phase 0 runs on the same engines as phases 1 and 2 (:func:`~monai_medmerge.workflows.engines.phase_trainer`); in a
bundle each source's fine-tuning has its own best file, periodic checkpoints and completion marker in the bundle's
``models/`` folder, so an interrupted phase 0 resumes like the other phases.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.engines import default_prepare_batch
from monai.metrics import DiceMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import evenly_divisible_all_gather
from torch import nn

from monai_medmerge.io import write_json
from monai_medmerge.networks import head_names, replace_head
from monai_medmerge.sources import load_checkpoint
from monai_medmerge.workflows import engines
from monai_medmerge.workflows.metrics import classification_metrics
from monai_medmerge.workflows.training import linear_probe, predict

logger = logging.getLogger(__name__)

# the validation scores phase0_room measures, as its messages name them
ROOM_METRICS = {"macro_f1": "macro-F1", "mean_dice": "mean Dice"}

__all__ = [
    "PHASE2_STARTS",
    "RECIPES",
    "anchor_network",
    "check_phase2_start",
    "check_recipe",
    "example_input",
    "fine_tune_sources",
    "phase0_files",
    "phase0_room",
    "phase1_sources",
    "with_new_head",
]

RECIPES = ("direct", "paper")
# what phase 2 fine-tunes: the collapsed merge, or (paper recipe) the anchor's phase-0 network with no merge
PHASE2_STARTS = ("merge", "anchor")


def check_recipe(recipe: str) -> str:
    """``recipe`` if it is one of :data:`RECIPES`, else a ``ValueError`` that lists them."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}.")
    return recipe


def check_phase2_start(recipe: str, start: str) -> str:
    """``start`` if it is one of :data:`PHASE2_STARTS` and fits ``recipe``, else a ``ValueError`` saying why.

    ``"anchor"`` needs ``recipe="paper"``: it is the anchor's phase-0 network (fine-tuned on the target), which the
    direct recipe does not train."""
    if start not in PHASE2_STARTS:
        raise ValueError(f"phase2_start must be one of {', '.join(PHASE2_STARTS)}, got {start!r}.")
    if start == "anchor" and check_recipe(recipe) != "paper":
        raise ValueError(
            f"phase2_start: anchor needs recipe: paper (phase 2 then starts from the anchor's phase-0 network); "
            f"recipe {recipe!r} has no phase 0."
        )
    return start


def anchor_network(phase0_networks: Sequence[nn.Module], anchor: int, network_def: nn.Module) -> nn.Module:
    """``network_def`` with the weights of the anchor's phase-0 network (loaded strictly): what phase 2 fine-tunes
    with ``phase2_start: anchor``, so that ``model.pt`` is a state dict of ``network_def`` as with a merge.

    Raises:
        ValueError: for an ``anchor`` outside the networks, or a phase-0 network that does not fit ``network_def``.
    """
    if not 0 <= int(anchor) < len(phase0_networks):
        raise ValueError(f"anchor must index one of the {len(phase0_networks)} sources, got {anchor}.")
    try:
        network_def.load_state_dict(phase0_networks[int(anchor)].state_dict())
    except RuntimeError as e:
        raise ValueError(f"the anchor's phase-0 network (source {anchor}) does not fit network_def: {e}") from None
    return network_def


def with_new_head(
    source: nn.Module, head: str, num_classes: int, example_input: torch.Tensor | None = None
) -> nn.Module:
    """A copy of ``source`` whose module ``head`` is a fresh one with ``num_classes`` outputs (``source`` is left
    as it is); ``head="auto"`` finds it by running ``example_input`` (see
    :func:`monai_medmerge.networks.find_head`)."""
    net = copy.deepcopy(source)
    replace_head(net, head, int(num_classes), example_input)
    return net


def example_input(spatial_size: Sequence[int] | None, in_channels: int = 1) -> torch.Tensor | None:
    """A fixed random batch of two inputs of ``spatial_size`` (``None`` when no size is given), for tracing a
    network (``head="auto"``, alignment)."""
    if spatial_size is None:
        return None
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, int(in_channels), *[int(s) for s in spatial_size], generator=g)


def phase0_files(ckpt_dir: str | os.PathLike, index: int) -> tuple[Path, Path]:
    """The best-state file and the completion marker of phase 0 for source ``index`` in ``ckpt_dir``."""
    folder = Path(ckpt_dir)
    return folder / f"phase0_source{index}.pt", folder / f"phase0_source{index}.done"


def fine_tune_sources(
    sources: Sequence[nn.Module],
    head: str,
    num_classes: int,
    train_loader: Iterable,
    val_loader: Iterable,
    epochs: int = 30,
    lr: float = 1e-3,
    patience: int | None = 8,
    val_interval: int = 1,
    device: torch.device | str = "cpu",
    ckpt_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    loss_function: Callable | None = None,
    inferer: Any = None,
    recipe: str = "paper",
    task: str = "classification",
    spatial_size: Sequence[int] | None = None,
    in_channels: int = 1,
    head_epochs: int = 0,
    head_lr: float = 1e-2,
) -> list[nn.Module]:
    """Phase 0 of the ``paper`` recipe: each source with a new ``num_classes`` head, fine-tuned fully on the target;
    with ``head_epochs`` > 0 the new head is first trained alone on the frozen source (LP-FT,
    :func:`~monai_medmerge.workflows.training.linear_probe`).

    Args:
        sources: the source networks (left unchanged: each is copied first).
        head: dotted name of the classifier module to replace (``"fc"`` for MONAI ResNet), or ``"auto"``.
        num_classes: classes of the target (background included for segmentation).
        train_loader: target training batches (dicts with ``image``/``label`` or ``(image, label)`` pairs).
        val_loader: validation batches; the state of the best validation key metric of each source is kept
            (macro-F1, or mean Dice for segmentation).
        epochs, lr, patience, val_interval: Adam fine-tuning with early stopping, as phase 2.
        device: where to train.
        ckpt_dir: where to keep each source's best state (``phase0_source<i>.pt``), periodic checkpoints and
            completion marker (``phase0_source<i>.done``), for phase 1 and for resuming; ``None``: nothing written.
        resume: continue from the latest checkpoints in ``ckpt_dir``; a source marked complete is loaded, not
            trained again.
        progress: a progress bar per source.
        loss_function: the trainer's loss (default: the task's, :func:`~monai_medmerge.workflows.engines.default_loss`).
        inferer: the evaluator's inferer (default: a plain forward pass).
        recipe: ``"direct"`` returns ``sources`` as they are (so a bundle can run this step for either recipe).
        task: ``"classification"`` or ``"segmentation"`` (the validation metric and the default loss).
        spatial_size, in_channels: the size of an example input, to find ``head="auto"``.
        head_epochs: epochs of training the new head alone before the fine-tuning (0: none; patience as above).
            It is not checkpointed: an interrupted run repeats it, unless the source's fine-tuning has a checkpoint
            to resume from, which holds the trained head already.
        head_lr: learning rate of that head-only training.

    Returns:
        the fine-tuned networks in eval mode, in the order of ``sources``.
    """
    if check_recipe(recipe) == "direct":
        return list(sources)
    engines.check_task(task)
    if head_epochs < 0:
        raise ValueError(f"head_epochs must be >= 0 (0: no head-only training first), got {head_epochs}.")
    if loss_function is None:
        loss_function = engines.default_loss(task)
    example = example_input(spatial_size, in_channels)
    tuned = []
    for i, source in enumerate(sources):
        net = with_new_head(source, head, num_classes, example).to(device)
        best = marker = None
        if ckpt_dir is not None:
            best, marker = phase0_files(ckpt_dir, i)
            if engines.phase_completed(marker, resume):
                net.load_state_dict(load_checkpoint(best))
                tuned.append(net.eval())
                continue
        resuming = resume and ckpt_dir is not None and engines.latest_checkpoint(ckpt_dir, f"phase0_source{i}")
        if head_epochs and not resuming:
            heads = head_names(net, head, example)
            linear_probe(
                net,
                heads,
                train_loader,
                val_loader,
                epochs=head_epochs,
                lr=head_lr,
                patience=patience,
                device=device,
                progress=progress,
                desc=f"phase 0: the new head of source {i}, its body frozen",
                loss_function=loss_function,
                task=task,
                num_classes=num_classes,
                inferer=inferer,
            )
            # under torchrun each process probes on its own shard; wrapping the network in DistributedDataParallel
            # below broadcasts process 0's states, its probed head included, so all fine-tune from one network
        for p in net.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        # under torchrun (the multi-GPU overlay) every process trains the same network with averaged gradients
        model = net
        if _distributed():
            model = nn.parallel.DistributedDataParallel(net, device_ids=[device] if torch.cuda.is_available() else None)
        evaluator = engines.phase_evaluator(
            model, val_loader, device=device, num_classes=num_classes, inferer=inferer, task=task
        )
        checkpoint = None
        if ckpt_dir is not None:
            checkpoint = engines.ResumableCheckpoint(
                ckpt_dir, f"phase0_source{i}", {"model": net, "optimizer": optimizer}, resume=resume
            )
        trainer = engines.phase_trainer(
            model,
            train_loader,
            evaluator,
            optimizer,
            epochs,
            device=device,
            loss_function=loss_function,
            patience=patience,
            val_interval=val_interval,
            best_path=best,
            checkpoint=checkpoint,
            train_handlers=[engines.PhaseMarker(marker)] if marker is not None else None,
            progress=progress,
            desc=f"phase 0: fine-tune source {i} on the target",
        )
        trainer.run()
        tuned.append(net.eval())
    if _distributed():
        torch.distributed.barrier()  # process 0 writes the best states that phase 1 reads
    return tuned


def phase0_room(
    networks: Sequence[nn.Module],
    val_loader: Iterable,
    device: torch.device | str = "cpu",
    path: str | os.PathLike | None = None,
    task: str = "classification",
    inferer: Callable | None = None,
    num_classes: int | None = None,
) -> dict:
    """The room of a run, measured after phase 0: the validation score of each phase-0 network and of their ensemble
    (mean probabilities), and the ensemble's lead over the best of them. That lead is what a merge or a distilled
    phase 2 (``distill_weight``) can take into one network; where it is not positive, neither has much to take, and
    distillation from that ensemble cost points on the benchmarks (docs/benchmarks.md).

    The score is the one phase 0 keeps its best network by: macro-F1 for classification; for segmentation
    (``task="segmentation"``, with the validation ``inferer``, e.g. a sliding window, and ``num_classes`` with the
    background) MONAI's mean Dice over the foreground labels of the argmax label map, averaged over images as the
    phase evaluator does. The numbers are logged, and written to ``path`` (JSON, by process 0 under torchrun) when
    given. Under torchrun the results of every process are gathered first: each process measures the whole
    validation set.

    Returns:
        ``{"metric": "macro_f1" | "mean_dice", "networks": [score, ...], "ensemble": score, "room": ensemble -
        max(networks), "images": n}``, ``n`` the number of validation images measured.
    """
    if task == "segmentation":
        metric, (scores, ensemble, images) = (
            "mean_dice",
            _segmentation_room(networks, val_loader, device, inferer, num_classes),
        )
    elif task == "classification":
        outputs = [_gathered(*predict(net, val_loader, device)) for net in networks]
        labels = outputs[0][1]
        metric, images = "macro_f1", len(labels)
        scores = [classification_metrics(labels, probs)["macro_f1"] for probs, _ in outputs]
        ensemble = classification_metrics(labels, np.mean([probs for probs, _ in outputs], axis=0))["macro_f1"]
    else:
        raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}.")
    room = {
        "metric": metric,
        "networks": scores,
        "ensemble": ensemble,
        "room": ensemble - max(scores),
        "images": images,
    }
    logger.info(
        "phase 0, validation %s: networks %s, their ensemble %.3f: room %+.3f%s",
        ROOM_METRICS[metric],
        ", ".join(f"{s:.3f}" for s in scores),
        ensemble,
        room["room"],
        "" if room["room"] > 0 else " (no room: a merge or a distilled phase 2 has little to take)",
    )
    if path is not None and (not _distributed() or torch.distributed.get_rank() == 0):
        write_json(path, room)
    return room


def _segmentation_room(
    networks: Sequence[nn.Module],
    val_loader: Iterable,
    device: torch.device | str,
    inferer: Callable | None,
    num_classes: int | None,
) -> tuple[list[float], float, int]:
    """Mean Dice of each network and of their mean probabilities (see :func:`phase0_room`), and the image count."""
    if num_classes is None:
        raise ValueError("phase0_room(task='segmentation') needs num_classes (the labels, background included).")
    dice = DiceMetric(include_background=False, reduction="none", num_classes=int(num_classes))
    was_training = [net.training for net in networks]
    values: list[list[torch.Tensor]] = [[] for _ in range(len(networks) + 1)]  # the networks', then the ensemble's
    try:
        for net in networks:
            net.eval()
        with torch.no_grad():
            for batch in val_loader:
                x, y = default_prepare_batch(batch, device)
                probs = [(inferer(x, net) if inferer is not None else net(x)).float().softmax(1) for net in networks]
                for i, p in enumerate([*probs, torch.stack(probs).mean(0)]):
                    values[i].append(dice(p.argmax(1, keepdim=True), y).cpu())
    finally:
        for net, mode in zip(networks, was_training, strict=True):
            net.train(mode)
    per_image = [torch.cat(v) for v in values]
    if _distributed():
        per_image = [evenly_divisible_all_gather(v.to(device), concat=True).cpu() for v in per_image]
    means = [float(do_metric_reduction(v, "mean")[0]) for v in per_image]
    return means[:-1], means[-1], len(per_image[0])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gathered(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Under torchrun every process predicts its shard of the validation set: the predictions of all of them (shards
    of unequal length included), so that each process measures the whole set."""
    if not _distributed():
        return probs, labels
    gather = [evenly_divisible_all_gather(torch.as_tensor(a), concat=True).numpy() for a in (probs, labels)]
    return gather[0], gather[1]


def phase1_sources(
    recipe: str,
    sources: Sequence[nn.Module],
    head: str,
    num_classes: int,
    ckpt_dir: str | os.PathLike,
    spatial_size: Sequence[int] | None = None,
    in_channels: int = 1,
) -> list[nn.Module]:
    """The networks phase 1 merges: ``sources`` for ``direct``; for ``paper`` the phase-0 networks in ``ckpt_dir``
    (``spatial_size`` and ``in_channels`` make the example input that finds ``head="auto"``).

    Raises:
        FileNotFoundError: (``paper``) when phase 0 has not completed for a source: the message names the marker
            and says to run phase 0 first.
    """
    if check_recipe(recipe) == "direct":
        return list(sources)
    nets = []
    for i, source in enumerate(sources):
        best, marker = phase0_files(ckpt_dir, i)
        if not marker.is_file() or not best.is_file():
            raise FileNotFoundError(
                f"recipe 'paper': phase 0 has not completed for source {i} ({marker} is missing): run phase 0 first "
                "(`python -m monai.bundle run phase0 ...`, or all phases with `run paper ...`), or set recipe: direct"
            )
        net = with_new_head(source, head, num_classes, example_input(spatial_size, in_channels))
        net.load_state_dict(load_checkpoint(best))
        nets.append(net.eval())
    return nets
