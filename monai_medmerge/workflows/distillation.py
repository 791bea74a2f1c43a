"""Phase 2 distilled from an ensemble: take what several fine-tuned networks know together into one network.

The ensemble of the paper recipe's phase-0 networks (each source fine-tuned on the target) is often better than any
of them, at N times the inference cost. A distilled phase 2 trains the one network on two terms a step: the task's
loss on the labelled batch, plus ``weight`` times the KL divergence from the teachers' mean probabilities to the
network's on as many extra images, drawn from a pool of unlabelled images of the target domain (or, without one,
mixup blends of the labelled batch). Both halves go through the network in one forward pass, so its norm layers see
them together.

Cost: per training step, each teacher runs one forward pass (no gradient) over the extra images, and the network
trains on twice the batch. With few labels the labelled set is a handful of batches, so the benchmark trains a fixed
number of steps per epoch (``epoch_length``) to let the teachers' images reach the network (docs/benchmarks.md).

:class:`EnsembleDistillation` gives the two pieces a MONAI trainer takes: ``prepare_batch`` (the labelled batch and
the extra images, with the teachers' probabilities kept for the loss) and ``loss``;
:func:`fine_tune_distilled` runs :func:`~monai_medmerge.workflows.training.fine_tune` with them, and the training
bundle's phase 2 uses them with ``distill_weight > 0``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import default_prepare_batch
from torch import nn

from monai_medmerge.workflows import engines, recipes

logger = logging.getLogger(__name__)

__all__ = [
    "EnsembleDistillation",
    "check_distillation",
    "fine_tune_distilled",
    "phase2_distillation",
    "phase2_save_dict",
]


class EnsembleDistillation:
    """The distillation of a phase: a ``prepare_batch`` and a ``loss`` for one MONAI ``SupervisedTrainer``.

    ``prepare_batch`` reads the labelled batch (``n`` images) as the trainer would, draws ``n`` extra images, runs
    the teachers on them (eval mode, no gradient; their mean softmax is kept) and hands the trainer both halves as
    one input of ``2 n`` images; ``loss`` is ``base_loss`` on the first ``n`` outputs plus ``weight`` times the KL
    divergence of the teachers' mean probabilities from the network's on the rest (summed over classes, averaged over
    images and, for segmentation outputs, over voxels).

    Args:
        teachers: the networks whose mean probabilities are the soft targets (e.g. the phase-0 networks); they are
            put in eval mode and never trained. They must be on the trainer's device.
        weight: weight of the distillation term (>= 0; 0 trains on the labelled loss alone, drawing nothing).
        unlabeled: where the extra images come from: ``None``, mixup blends of the labelled batch (a uniform blend
            weight per image, its partner a random other image of the batch); a tensor of images ``(M, C, ...)``,
            ``n`` rows drawn at random each step; or an iterable of batches (a DataLoader of unlabelled images: dicts
            with ``image`` or tensors), read in turn and restarted when exhausted, its batches cut or joined to
            ``n`` images.
        base_loss: the loss of the labelled half (default: the task's, e.g. cross-entropy).
        seed: seed of the random draws (blends, rows of a tensor pool).
        prepare_batch: how a labelled batch becomes ``(image, label)`` (MONAI's default).
        task: ``"classification"`` or ``"segmentation"`` (the default ``base_loss``).

    Raises:
        ValueError: for no teacher, a teacher that is not a module, a negative weight, or an empty tensor pool.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        weight: float = 1.0,
        unlabeled: torch.Tensor | Iterable | None = None,
        base_loss: Callable | None = None,
        seed: int = 0,
        prepare_batch: Callable = default_prepare_batch,
        task: str = "classification",
    ) -> None:
        teachers = list(teachers)
        if not teachers:
            raise ValueError("EnsembleDistillation: no teacher network given.")
        for i, t in enumerate(teachers):
            if not isinstance(t, nn.Module):
                raise ValueError(f"EnsembleDistillation: teacher {i} is a {type(t).__name__}, not a torch module.")
        if float(weight) < 0:
            raise ValueError(f"EnsembleDistillation: weight must be >= 0, got {weight}.")
        if isinstance(unlabeled, torch.Tensor) and len(unlabeled) == 0:
            raise ValueError("EnsembleDistillation: the tensor of unlabelled images is empty.")
        self.teachers = tuple(t.eval() for t in teachers)  # run under no_grad: never trained here
        self.weight = float(weight)
        self.unlabeled = unlabeled
        self.base_loss = base_loss if base_loss is not None else engines.default_loss(task)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._prepare = prepare_batch
        self._batches: Iterator | None = None
        self._passes = 0  # passes over the unlabelled loader begun
        self._read = 0  # batches read in the current pass
        self._pass_start: torch.Tensor | None = None  # the loader's generator state when the current pass began
        self.target: torch.Tensor | None = None

    def prepare_batch(
        self, batchdata: Any, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs
    ):
        """``(labelled images and extra images in one tensor, labels)``; the teachers' probabilities on the extra
        images are kept for :meth:`loss`."""
        x, y = self._prepare(batchdata, device, non_blocking, **kwargs)[:2]
        if not self.weight:
            self.target = None
            return x, y
        extra = self._extra(x)
        with torch.no_grad():
            self.target = torch.stack([t(extra).softmax(1) for t in self.teachers]).mean(0)
        return torch.cat([x, extra]), y

    def loss(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``base_loss`` on the labelled half plus ``weight`` x KL(teachers || network) on the extra half."""
        if self.target is None:
            return self.base_loss(pred, label)
        n = pred.shape[0] - self.target.shape[0]
        log_p = pred[n:].log_softmax(1)
        # KL summed over the classes, averaged over the rest (images, and voxels of a segmentation output): for
        # (N, C) outputs this is torch's "batchmean"
        kl = nn.functional.kl_div(log_p, self.target, reduction="sum") / (log_p.numel() // log_p.shape[1])
        return self.base_loss(pred[:n], label) + self.weight * kl

    def _extra(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.unlabeled is None:
            lam = torch.rand(n, *([1] * (x.dim() - 1)), generator=self.generator).to(x)
            return lam * x + (1 - lam) * x[torch.randperm(n, generator=self.generator).to(x.device)]
        if isinstance(self.unlabeled, torch.Tensor):
            return self.unlabeled[torch.randint(len(self.unlabeled), (n,), generator=self.generator)].to(x)
        parts, have = [], 0
        while have < n:
            part = self._next_unlabeled().to(x)
            if part.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"EnsembleDistillation: an unlabelled batch has images of shape {tuple(part.shape[1:])}, the "
                    f"labelled ones {tuple(x.shape[1:])}: the unlabelled images need the same preprocessing."
                )
            parts.append(part[: n - have])
            have += len(parts[-1])
        return torch.cat(parts)

    def state_dict(self) -> dict:
        """Where the draws stand: the generator of the blends and pool rows, and the position in the unlabelled
        loader (its passes, the batches read in this one, its generator's state when this pass began), so that a
        resumed phase (``ResumableCheckpoint``'s ``save_dict``) draws what the uninterrupted one would have."""
        state = {"generator": self.generator.get_state(), "passes": self._passes, "read": self._read}
        if self._pass_start is not None:
            state["loader_generator"] = self._pass_start
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the draws from :meth:`state_dict`'s ``state``; the unlabelled loader must be built as before (the
        same images, batch size, seed): its current pass is replayed up to the saved position."""
        missing = {"generator", "passes", "read"} - set(state)
        if missing:
            raise ValueError(f"EnsembleDistillation: the saved state lacks {', '.join(sorted(missing))}.")
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))
        self._passes, self._read = int(state["passes"]), int(state["read"])
        start = state.get("loader_generator")
        self._pass_start = None if start is None else torch.as_tensor(start, dtype=torch.uint8)
        self._batches = None
        if self._passes and self.unlabeled is not None and not isinstance(self.unlabeled, torch.Tensor):
            self._batches = self._begin_pass(replay=True)

    def _begin_pass(self, replay: bool = False) -> Iterator:
        """An iterator over the unlabelled loader: a new pass (its sampler's epoch set, as a DataLoader over a
        ``DistributedSampler`` needs for a new order each pass), or with ``replay`` the current pass again from its
        start, advanced past the batches already read."""
        loader = self.unlabeled
        generator = getattr(loader, "generator", None)
        sampler = getattr(loader, "sampler", None)
        if replay:
            if generator is not None and self._pass_start is not None:
                generator.set_state(self._pass_start)
        else:
            self._pass_start = generator.get_state() if generator is not None else None
            self._passes, self._read = self._passes + 1, 0
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self._passes - 1)
        batches = iter(loader)
        for _ in range(self._read if replay else 0):
            next(batches, None)
        return batches

    def _next_unlabeled(self) -> torch.Tensor:
        for _ in range(2):
            if self._batches is None:
                self._batches = self._begin_pass()
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches = None  # an epoch of the unlabelled loader ended: start the next one
                continue
            self._read += 1
            image = (
                batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
            )
            return torch.as_tensor(image)
        raise ValueError("EnsembleDistillation: the unlabelled images are empty (the loader gave no batch).")


def fine_tune_distilled(
    model: nn.Module,
    teachers: Sequence[nn.Module],
    train_loader: Iterable,
    val_loader: Iterable,
    unlabeled: torch.Tensor | Iterable | None = None,
    weight: float = 1.0,
    seed: int = 0,
    epoch_length: int | None = None,
    **fine_tune_args: Any,
):
    """:func:`~monai_medmerge.workflows.training.fine_tune` of ``model`` distilled from the ensemble of ``teachers``
    (:class:`EnsembleDistillation`); ``epoch_length`` training steps per epoch (``None``: one pass over
    ``train_loader``; more restarts it as needed). ``fine_tune_args`` go to ``fine_tune`` (``epochs``, ``lr``,
    ``patience``, ``device``, ``task``, ...; a ``loss_function`` there is the labelled half's loss).

    Returns:
        ``(model with the best validation state, in eval mode, History)``, as ``fine_tune``.
    """
    from monai_medmerge.workflows.training import fine_tune

    device = fine_tune_args.get("device", "cpu")
    for t in teachers:
        t.to(device)
    distillation = EnsembleDistillation(
        teachers,
        weight,
        unlabeled,
        base_loss=fine_tune_args.pop("loss_function", None),
        seed=seed,
        task=fine_tune_args.get("task", "classification"),
    )
    return fine_tune(
        model,
        train_loader,
        val_loader,
        loss_function=distillation.loss,
        prepare_batch=distillation.prepare_batch,
        epoch_length=epoch_length,
        **fine_tune_args,
    )


def check_distillation(
    recipe: str, weight: float, unlabeled_section: str | None = None, steps_per_epoch: int | None = None
) -> dict:
    """The training bundle's distillation settings, checked when a run starts (before phase 0 or 1 spends any
    time), as a dict for the run's fingerprint.

    Raises:
        ValueError: for a negative ``weight``; ``weight > 0`` with a recipe other than ``paper`` (the teachers are
            the phase-0 networks, each source fine-tuned on the target: the direct recipe has none); an
            ``unlabeled_section`` with ``weight`` 0 (it would be read for nothing); ``steps_per_epoch`` below 1.
    """
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"distill_weight must be a number >= 0 (0: no distillation), got {weight!r}.") from None
    if weight < 0:
        raise ValueError(f"distill_weight must be >= 0 (0: no distillation), got {weight}.")
    if weight and recipe != "paper":
        raise ValueError(
            f"distill_weight={weight} needs recipe: paper: the teachers are the phase-0 networks (each source "
            f"fine-tuned on the target); recipe {recipe!r} has none. Set recipe: paper, or distill_weight: 0."
        )
    if unlabeled_section and not weight:
        raise ValueError(
            f"unlabeled_section={unlabeled_section!r} is only read by the distilled phase 2: set distill_weight > 0 "
            "(e.g. 1.0), or unlabeled_section: null."
        )
    if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
        raise ValueError(
            f"phase2_steps_per_epoch must be an integer >= 1 or null (one pass over the training images), got "
            f"{steps_per_epoch!r}."
        )
    return {"weight": weight, "unlabeled_section": unlabeled_section, "steps_per_epoch": steps_per_epoch}


def phase2_distillation(
    recipe: str,
    weight: float,
    teachers: Sequence[nn.Module],
    unlabeled: Iterable | None = None,
    base_loss: Callable | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    room_path: str | os.PathLike | None = None,
) -> EnsembleDistillation | None:
    """The training bundle's phase-2 distillation: ``None`` with ``weight`` 0; else an :class:`EnsembleDistillation`
    from ``teachers`` (the phase-0 networks, moved to ``device``), which needs ``recipe="paper"``. With ``room_path``
    (the room phase 0 wrote, :func:`~monai_medmerge.workflows.recipes.phase0_room`) a warning says when the teachers'
    ensemble was no better on validation than the best of them: distilling it then cost points on the benchmarks.

    Raises:
        ValueError: as :func:`check_distillation`.
    """
    if not check_distillation(recipe, weight)["weight"]:
        return None
    if room_path is not None and Path(room_path).is_file():
        try:
            recorded = json.loads(Path(room_path).read_text())
            room = float(recorded["room"])
            metric = recipes.ROOM_METRICS.get(recorded.get("metric", "macro_f1"), recorded.get("metric"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("could not read the room of phase 0 from %s (%s); distilling anyway", room_path, e)
        else:
            if room <= 0:
                logger.warning(
                    "distill_weight=%s, but on validation the ensemble of the phase-0 networks led the best of "
                    "them by %+.3f %s (%s): it has nothing to teach, and distilling such an ensemble cost points "
                    "on the benchmarks (docs/user_guide.md); consider distill_weight: 0",
                    weight,
                    room,
                    metric,
                    room_path,
                )
    return EnsembleDistillation([t.to(device) for t in teachers], weight, unlabeled, base_loss=base_loss, seed=seed)


def phase2_save_dict(
    network: nn.Module, optimizer: torch.optim.Optimizer, distillation: EnsembleDistillation | None = None
) -> dict:
    """What a training bundle's phase-2 checkpoint holds: the network and its optimizer, and with a distilled phase 2
    also ``distillation`` (where its draws stand), so that a resumed run draws what the uninterrupted one would."""
    saved = {"model": network, "optimizer": optimizer}
    if distillation is not None:
        saved["distillation"] = distillation
    return saved
