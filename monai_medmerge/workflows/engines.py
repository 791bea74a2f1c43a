"""The pieces that the bundle configs put on MONAI/Ignite engines for two-phase merge training.

Phase 1 trains the merge coefficients and the new head of a :class:`~monai_medmerge.networks.KernelMerge` (a
``SupervisedTrainer`` over :func:`merge_parameter_groups`); :func:`collapse_merge` turns its best checkpoint into a
plain network with recomputed norm statistics; phase 2 fine-tunes that network. :class:`ClassificationScore` gives
macro-F1, accuracy, balanced accuracy and AUROC as Ignite metrics (gathered across processes under torchrun);
:class:`ResumableCheckpoint` and :class:`PhaseMarker` let an interrupted run continue where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.handlers import CheckpointSaver
from monai.utils import optional_import
from torch import nn

from monai_medmerge.merging import get_method, recalibrate_norm
from monai_medmerge.networks import KernelMerge
from monai_medmerge.sources import load_checkpoint, load_source
from monai_medmerge.workflows.metrics import classification_metrics

Events, _ = optional_import("ignite.engine", name="Events")
Metric, has_ignite = optional_import("ignite.metrics", name="Metric", as_type="base")
reinit__is_reduced, _ = optional_import("ignite.metrics.metric", name="reinit__is_reduced", as_type="decorator")

__all__ = [
    "SCORES",
    "AtomicCheckpointSaver",
    "ClassificationScore",
    "PhaseMarker",
    "ResumableCheckpoint",
    "build_merge",
    "collapse_merge",
    "latest_checkpoint",
    "load_sources",
    "merge_parameter_groups",
    "phase_completed",
]

SCORES = ("macro_f1", "accuracy", "balanced_accuracy", "auroc")

logger = logging.getLogger(__name__)


def load_sources(specs: Sequence[str | os.PathLike | Mapping[str, Any]]) -> list[nn.Module]:
    """Load the source networks a bundle config names.

    Args:
        specs: one entry per source: a bundle folder (path), or a mapping with either ``bundle`` (a folder) or
            ``checkpoint`` (a ``.pt``/``.safetensors`` file, loaded without unpickling code) plus ``network_def``
            (a MONAI config with a full dotted ``_target_``, or a module); optional ``key`` (the checkpoint entry
            that holds the state dict) and ``strict``.

    Returns:
        the networks, in eval mode, in the order given.

    Raises:
        ValueError: for fewer than two sources or an entry that names neither a bundle nor a checkpoint (the
            message gives the entry's index); errors of :func:`~monai_medmerge.sources.load_source` otherwise.
    """
    if isinstance(specs, (str, os.PathLike, Mapping)) or len(specs) < 2:
        raise ValueError(f"sources must be a list of at least two sources, got {specs!r}.")
    for i, spec in enumerate(specs):  # every entry is checked before any network is built
        if isinstance(spec, (str, os.PathLike)):
            continue
        if not isinstance(spec, Mapping):
            raise ValueError(f"sources[{i}] must be a bundle folder or a mapping, got {type(spec).__name__}.")
        unknown = sorted(set(spec) - {"bundle", "checkpoint", "network_def", "key", "strict"})
        if unknown:
            raise ValueError(
                f"sources[{i}] has unknown field(s) {unknown}; expected bundle, or checkpoint + network_def "
                "(optional key, strict)."
            )
        if ("bundle" in spec) == ("checkpoint" in spec):
            raise ValueError(f"sources[{i}] needs exactly one of 'bundle' or 'checkpoint', got fields {sorted(spec)}.")
        if "checkpoint" in spec and spec.get("network_def") is None:
            raise ValueError(f"sources[{i}]: checkpoint {spec['checkpoint']} needs a 'network_def'.")
    out = []
    for spec in specs:
        if isinstance(spec, (str, os.PathLike)):
            out.append(load_source(spec))
            continue
        path = spec.get("bundle", spec.get("checkpoint"))
        out.append(
            load_source(path, spec.get("network_def"), key=spec.get("key"), strict=bool(spec.get("strict", True)))
        )
    return out


def _image_batches(loader: Iterable | None, max_batches: int, key: str = "image") -> list[torch.Tensor] | None:
    if loader is None:
        return None
    batches = []
    for batch in loader:
        if len(batches) >= max_batches:
            break
        x = batch[key] if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (list, tuple)) else batch
        batches.append(torch.as_tensor(x).float().cpu())
    if not batches:
        raise ValueError("the alignment data loader yielded no batch.")
    return batches


def build_merge(
    sources: Sequence[nn.Module],
    head: str,
    num_classes: int,
    method: str = "kernel",
    anchor: int | None = 0,
    anchor_weight: float | None = None,
    align: bool = False,
    matching: str = "weights",
    align_data: Iterable | None = None,
    align_batches: int = 4,
    spatial_size: Sequence[int] | None = None,
    in_channels: int = 1,
) -> KernelMerge:
    """The phase-1 network: a :class:`KernelMerge` of ``sources`` with a new ``num_classes`` head.

    Args:
        sources: networks of one class (their heads may differ in size).
        head: dotted name of the classifier module to replace (``"fc"`` for MONAI ResNet,
            ``"class_layers.out"`` for DenseNet121, ``"last_linear"`` for SEResNet).
        num_classes: classes of the target task.
        method: a learned merge method of the registry: ``"kernel"`` (MedMerge), ``"layer"`` or ``"model"``.
        anchor: index of the source whose coefficients start high and whose channel order alignment keeps.
        anchor_weight: starting share of the anchor (default 0.9).
        align: permute the other sources' channels onto the anchor's first (function-preserving).
        matching: ``"weights"`` (no data needed) or ``"activations"`` (uses ``align_data``).
        align_data: a loader of target images (dict batches with ``"image"``) for activation matching.
        align_batches: batches of ``align_data`` used at most.
        spatial_size: input size of an example batch for tracing the network (default: from the first conv).
        in_channels: input channels of that batch.

    Raises:
        ValueError: for a merge method with fixed coefficients or the errors of the merge and alignment.
    """
    m = get_method(method, anchor=anchor, anchor_weight=anchor_weight, align=align, matching=matching)
    if not m.learned:
        raise ValueError(f"merge method {method!r} has fixed coefficients; phase 1 needs kernel, layer or model.")
    example = None
    if spatial_size is not None:
        g = torch.Generator().manual_seed(0)
        example = torch.randn(2, in_channels, *[int(s) for s in spatial_size], generator=g)
    data = _image_batches(align_data, align_batches) if align and matching == "activations" else None
    return m.build(sources, head=head, out_channels=int(num_classes), example_input=example, align_data=data)


def merge_parameter_groups(network: nn.Module, coef_lr: float, head_lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups for phase 1: the merge coefficients at ``coef_lr``, everything else trainable
    (the new head) at ``head_lr``. ``network`` may be wrapped in DistributedDataParallel.

    Raises:
        ValueError: when ``network`` holds no KernelMerge coefficients.
    """
    coef, rest = [], []
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        (coef if name.split(".")[-1] == "merge_logits" else rest).append(p)
    if not coef:
        raise ValueError(f"{type(network).__name__} has no parameter named 'merge_logits': is it a KernelMerge?")
    groups = [{"params": coef, "lr": float(coef_lr)}]
    if rest:
        groups.append({"params": rest, "lr": float(head_lr)})
    return groups


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if hasattr(network, "module") and isinstance(network.module, nn.Module) else network


def collapse_merge(
    merge: nn.Module,
    checkpoint: str | os.PathLike | None = None,
    loader: Iterable | None = None,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    network_def: nn.Module | None = None,
) -> nn.Module:
    """The plain network that phase 2 fine-tunes: ``merge`` with the phase-1 checkpoint loaded, collapsed, and its
    norm statistics recomputed on ``loader``.

    Args:
        merge: the phase-1 :class:`KernelMerge` (possibly wrapped in DistributedDataParallel).
        checkpoint: the best phase-1 checkpoint (a state dict of ``merge``, as the bundle's CheckpointSaver writes
            it); ``None`` uses ``merge`` as it is.
        loader: target training batches for norm recalibration (dicts with ``"image"``); ``None`` keeps the
            anchor's statistics.
        device: device of the returned network.
        max_batches: recalibrate on this many batches at most.
        network_def: an instance of the bundle's plain architecture; the collapsed weights are loaded into it
            (strictly) and it is returned, so that the trained ``model.pt`` is certain to be a state dict of it.

    Raises:
        FileNotFoundError: when ``checkpoint`` is given but missing (phase 1 has not saved a best checkpoint).
        ValueError: when the checkpoint was written for other sources or another order, or when the collapsed
            network does not fit ``network_def`` (the message lists the first differences).
    """
    merge = _unwrap(merge)
    if not isinstance(merge, KernelMerge):
        raise ValueError(f"collapse_merge needs a KernelMerge, got {type(merge).__name__}.")
    if checkpoint is not None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # process 0 writes the best checkpoint; everyone reads the final one
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"phase-1 checkpoint {path} not found: run phase 1 first (it saves its best validation macro-F1 there)."
            )
        state = load_checkpoint(path)
        merge.load_state_dict(state)
    plain = merge.collapse()
    if network_def is not None:
        try:
            network_def.load_state_dict(plain.state_dict(), strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"the collapsed merge ({type(plain).__name__}) does not fit network_def "
                f"({type(network_def).__name__}): set network_def to the sources' architecture with the target's "
                f"number of classes. {str(e)[:600]}"
            ) from e
        plain = network_def
    plain = plain.to(device)
    if loader is not None:
        recalibrate_norm(plain, loader, device=device, max_batches=max_batches)
    return plain


class ClassificationScore(Metric):
    """One classification score as an Ignite metric, computed over the whole epoch from softmax outputs.

    ``score`` is one of ``macro_f1`` (the primary metric), ``accuracy``, ``balanced_accuracy`` or ``auroc``
    (macro one-vs-rest, NaN when a class is missing). Under torch.distributed the predictions of every process are
    gathered first, so every rank reports the same value. The engine output is turned into ``(pred, label)`` by
    ``output_transform`` (default: ``monai.handlers.from_engine(["pred", "label"])``); ``pred`` holds class scores
    per item, ``label`` a class index or a one-hot vector.

    Args:
        score: which score.
        num_classes: number of classes (default: the width of ``pred``).
        output_transform: maps the engine output to ``(pred, label)``.

    Raises:
        ValueError: for an unknown ``score``.
    """

    def __init__(
        self, score: str = "macro_f1", num_classes: int | None = None, output_transform: Callable | None = None
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
        if output_transform is None:
            from monai.handlers import from_engine

            output_transform = from_engine(["pred", "label"])
        self.score = score
        self.num_classes = num_classes
        self._preds: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        super().__init__(output_transform=output_transform)

    @reinit__is_reduced
    def reset(self) -> None:
        self._preds, self._labels = [], []

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        pred, label = output
        pred = torch.stack([torch.as_tensor(p) for p in pred]) if isinstance(pred, (list, tuple)) else pred
        label = torch.stack([torch.as_tensor(v) for v in label]) if isinstance(label, (list, tuple)) else label
        pred = torch.as_tensor(pred).detach().float().cpu().reshape(len(pred), -1)
        label = torch.as_tensor(label).detach().cpu()
        if label.ndim > 1 and label.reshape(len(label), -1).shape[1] > 1:
            label = label.reshape(len(label), -1).argmax(1)
        self._preds.append(pred)
        self._labels.append(label.reshape(-1).long())

    def compute(self) -> float:
        if not self._preds:
            raise ValueError(f"ClassificationScore({self.score!r}) was computed before any update.")
        preds, labels = torch.cat(self._preds), torch.cat(self._labels)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from monai.utils import evenly_divisible_all_gather

            preds = evenly_divisible_all_gather(preds, concat=True)
            labels = evenly_divisible_all_gather(labels, concat=True)
        scores = classification_metrics(labels.numpy(), preds.numpy(), self.num_classes)
        return float(scores[self.score])


_EPOCH = re.compile(r"_checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str) -> Path | None:
    """The newest ``{prefix}_checkpoint_epoch=N.pt`` in ``ckpt_dir`` (the highest N), or ``None``."""
    found = []
    for p in Path(ckpt_dir).glob(f"{prefix}_checkpoint_epoch=*.pt"):
        m = _EPOCH.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


BaseSaveHandler, _ = optional_import("ignite.handlers.checkpoint", name="BaseSaveHandler", as_type="base")


class _SaveBeforeRemove(BaseSaveHandler):
    """Wraps an Ignite disk saver: write the new checkpoint atomically first, delete the old ones after.

    Ignite's ``Checkpoint`` deletes the oldest file *before* it writes the new one, so with ``n_saved=1`` a process
    killed while saving leaves no checkpoint at all; and MONAI's fixed-name saver deletes the very file it is about to
    replace. Here removals wait until the new file is in place, and a fixed-name file is only ever replaced.
    """

    def __init__(self, handler) -> None:
        self.handler = handler
        self.handler._atomic = True
        self.pending: list[str] = []

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        self.handler(checkpoint, filename, metadata)
        fixed = getattr(self.handler, "filename", None)
        pending, self.pending = self.pending, []
        if fixed is None:
            for old in pending:
                if old != filename:
                    self.handler.remove(old)

    def remove(self, filename: str) -> None:
        self.pending.append(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments), made safe against a run killed while it saves.

    Each file is written under a temporary name in the same folder and renamed into place, and older checkpoints
    are deleted only after the new one is complete. MONAI's saver writes in place and Ignite deletes the previous
    checkpoint before writing the next: the bundle's resume test, killing a run as the file appeared, found an
    empty ``.pt``, and a kill inside a save could leave no checkpoint at all.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = _SaveBeforeRemove(ckpt.save_handler)


class ResumableCheckpoint:
    """Periodic checkpoints of a phase and, with ``resume``, continuing from the latest one.

    At the end of every ``interval`` epochs it saves ``save_dict`` plus the trainer itself (its epoch and
    iteration) as ``{prefix}_checkpoint_epoch=N.pt`` in ``ckpt_dir``, keeping the newest only (MONAI
    ``CheckpointSaver``, written atomically; only process 0 writes under torch.distributed). With ``resume`` true,
    when the trainer starts it restores the newest such file with ``weights_only`` loading, so the trainer
    continues with the next epoch; without a checkpoint it starts from the beginning. The trainer is taken from the
    engine the handler is attached to, so configs need not reference the trainer from its own handlers.

    Args:
        ckpt_dir: folder of the checkpoints.
        prefix: file prefix of this phase (``"phase1"``, ``"phase2"``).
        save_dict: objects to save and restore, e.g. ``{"model": network, "optimizer": optimizer}``.
        resume: continue from the latest checkpoint if there is one.
        interval: save every this many epochs.
        map_location: passed to ``torch.load``.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        prefix: str,
        save_dict: Mapping[str, Any],
        resume: bool = False,
        interval: int = 1,
        map_location: Any = None,
    ) -> None:
        if "trainer" in save_dict:
            raise ValueError("save_dict must not hold 'trainer': the engine the handler is attached to is added.")
        self.ckpt_dir = Path(ckpt_dir)
        self.prefix = prefix
        self.save_dict = dict(save_dict)
        self.resume = bool(resume)
        self.interval = int(interval)
        self.map_location = map_location
        self.loaded: Path | None = None

    def attach(self, engine) -> None:
        objects = {**self.save_dict, "trainer": engine}
        engine.add_event_handler(Events.STARTED, self._restore, objects)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not dist or torch.distributed.get_rank() == 0:
            AtomicCheckpointSaver(
                save_dir=str(self.ckpt_dir),
                save_dict=objects,
                file_prefix=self.prefix,
                save_interval=self.interval,
                n_saved=1,
                epoch_level=True,
            ).attach(engine)

    def _restore(self, engine, objects) -> None:
        if not self.resume:
            return
        path = latest_checkpoint(self.ckpt_dir, self.prefix)
        if path is None:
            logger.info(f"resume: no {self.prefix} checkpoint in {self.ckpt_dir}; starting from the beginning")
            return
        from monai.handlers import CheckpointLoader

        CheckpointLoader(load_path=str(path), load_dict=objects, map_location=self.map_location)(engine)
        self.loaded = path
        logger.info(f"resume: {self.prefix} continues after epoch {engine.state.epoch} from {path}")


class PhaseMarker:
    """Write ``path`` (JSON: epochs run, best validation score) when a phase completes, including after early
    stopping, so that a resumed run skips a finished phase. Written to a temporary file, then renamed.

    Args:
        path: the marker file.
        rank0_only: only process 0 writes under torch.distributed.
    """

    def __init__(self, path: str | os.PathLike, rank0_only: bool = True) -> None:
        self.path = Path(path)
        self.rank0_only = rank0_only

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.rank0_only and dist and torch.distributed.get_rank() != 0:
            return
        state = engine.state
        info = {
            "epochs": int(state.epoch),
            "iterations": int(state.iteration),
            "best_metric": getattr(state, "best_metric", None),
            "best_metric_epoch": getattr(state, "best_metric_epoch", None),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(info, default=_json_default) + "\n")
        os.replace(tmp, self.path)


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.Tensor):
        return v.item()
    return str(v)


def phase_completed(marker: str | os.PathLike, resume: bool) -> bool:
    """Whether a resumed run may skip the phase whose :class:`PhaseMarker` is ``marker``."""
    done = bool(resume) and Path(marker).is_file()
    if done:
        logger.info(f"resume: {marker} says this phase completed earlier; skipping it")
    return done
