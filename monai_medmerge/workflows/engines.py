"""Two-phase merge training on MONAI engines: the ONE implementation the bundle configs and the Python API share.

:func:`phase_evaluator` and :func:`phase_trainer` build a phase: a MONAI ``SupervisedTrainer`` that validates with a
``SupervisedEvaluator`` every epoch, keeps the state of the best validation macro-F1 (in memory and, when asked, in a
file), stops early after ``patience`` epochs without improvement and shows a progress bar. Phase 1 trains the merge
coefficients and the new head of a :class:`~monai_medmerge.networks.KernelMerge` (:func:`phase1_network`,
:func:`merge_parameter_groups`); :func:`collapse_merge` turns its best state into a plain network with recomputed
norm statistics; phase 2 fine-tunes that network. ``bundles/medmerge_classification/configs/train.yaml`` builds its
engines with these functions, and :func:`monai_medmerge.workflows.fit` (with ``learn_coefficients`` and
``fine_tune`` on top) calls them too. :class:`ClassificationScore` gives the scores as Ignite metrics (gathered
across processes under torchrun); :class:`ResumableCheckpoint` and :class:`PhaseMarker` let an interrupted run
continue where it stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer, default_prepare_batch
from monai.utils import optional_import
from torch import nn

from monai_medmerge.io import atomic_write, write_json
from monai_medmerge.merging import get_method, recalibrate_norm
from monai_medmerge.merging.norm import batch_input
from monai_medmerge.networks import KernelMerge
from monai_medmerge.networks.heads import find_head, head_size
from monai_medmerge.sources import load_checkpoint, load_source, state_dict_diff
from monai_medmerge.workflows.metrics import SCORES, classification_metrics

Events, _ = optional_import("ignite.engine", name="Events")
Metric, has_ignite = optional_import("ignite.metrics", name="Metric", as_type="base")
reinit__is_reduced, _ = optional_import("ignite.metrics.metric", name="reinit__is_reduced", as_type="decorator")
ProgressBar, _ = optional_import("ignite.handlers", name="ProgressBar")
EarlyStopping, _ = optional_import("ignite.handlers", name="EarlyStopping")

__all__ = [
    "KEY_METRICS",
    "SCORES",
    "TASKS",
    "BestState",
    "ClassificationScore",
    "PhaseMarker",
    "ResumableCheckpoint",
    "check_task",
    "check_training",
    "collapse_merge",
    "default_loss",
    "latest_checkpoint",
    "load_sources",
    "merge_parameter_groups",
    "phase1_network",
    "phase_completed",
    "phase_evaluator",
    "run_fingerprint",
    "start_run",
    "phase_trainer",
    "save_states",
    "without_ddp",
]

logger = logging.getLogger(__name__)


def load_sources(specs: Sequence[str | os.PathLike | Mapping[str, Any]]) -> list[nn.Module]:
    """Load the source networks a bundle config names.

    Args:
        specs: one entry per source: a bundle folder (path), or a mapping with either ``bundle`` (a folder) or
            ``checkpoint`` (a ``.pt``/``.safetensors`` file, loaded without unpickling code) plus ``network_def``
            (a MONAI config with a full dotted ``_target_``, or a module); optional ``key`` (the checkpoint entry
            that holds the state dict) and ``strict``; a ``bundle`` entry may set ``trust_config: true`` to evaluate
            that bundle's config as MONAI does (by default it is read as data, see
            :func:`~monai_medmerge.sources.load_source`).

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
        unknown = sorted(set(spec) - {"bundle", "checkpoint", "network_def", "key", "strict", "trust_config"})
        if unknown:
            raise ValueError(
                f"sources[{i}] has unknown field(s) {unknown}; expected bundle, or checkpoint + network_def "
                "(optional key, strict, trust_config)."
            )
        if ("bundle" in spec) == ("checkpoint" in spec):
            raise ValueError(f"sources[{i}] needs exactly one of 'bundle' or 'checkpoint', got fields {sorted(spec)}.")
        if "checkpoint" in spec and spec.get("network_def") is None:
            raise ValueError(f"sources[{i}]: checkpoint {spec['checkpoint']} needs a 'network_def'.")
        if not isinstance(spec.get("trust_config", False), bool):
            raise ValueError(f"sources[{i}]: trust_config must be true or false, got {spec['trust_config']!r}.")
    out = []
    for spec in specs:
        if isinstance(spec, (str, os.PathLike)):
            out.append(load_source(spec))
            continue
        path = spec.get("bundle", spec.get("checkpoint"))
        out.append(
            load_source(
                path,
                spec.get("network_def"),
                key=spec.get("key"),
                strict=bool(spec.get("strict", True)),
                trust_config=spec.get("trust_config", False),
            )
        )
    return out


def _image_batches(loader: Iterable | None, max_batches: int, key: str = "image") -> list[torch.Tensor] | None:
    if loader is None:
        return None
    batches = []
    for batch in loader:
        if len(batches) >= max_batches:
            break
        batches.append(torch.as_tensor(batch_input(batch, key)).float().cpu())
    if not batches:
        raise ValueError("the alignment data loader yielded no batch.")
    return batches


def phase1_network(
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
    merge_heads: bool = False,
) -> KernelMerge:
    """The phase-1 network: a :class:`KernelMerge` of ``sources`` with a new ``num_classes`` head, or with their
    heads merged like every other layer (``merge_heads``, the ``paper`` recipe's sources already fine-tuned on the
    target).

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
        merge_heads: keep the sources' heads and merge them (they must all have ``num_classes`` outputs).

    Raises:
        ValueError: for a merge method with fixed coefficients, heads of another size with ``merge_heads``, or the
            errors of the merge and alignment.
    """
    m = get_method(method, anchor=anchor, anchor_weight=anchor_weight, align=align, matching=matching)
    if not m.learned:
        raise ValueError(f"merge method {method!r} has fixed coefficients; phase 1 needs kernel, layer or model.")
    example = None
    if spatial_size is not None:
        g = torch.Generator().manual_seed(0)
        example = torch.randn(2, in_channels, *[int(s) for s in spatial_size], generator=g)
    data = _image_batches(align_data, align_batches) if align and matching == "activations" else None
    if merge_heads:
        names = [find_head(s, example) if head == "auto" else head for s in sources]
        sizes = [head_size(s.get_submodule(n)) for s, n in zip(sources, names, strict=True)]
        if any(size != int(num_classes) for size in sizes):
            raise ValueError(
                f"merge_heads: every source's head {head!r} must have {num_classes} outputs (the target's classes), "
                f"got {sizes}: fine-tune the sources on the target first (recipe 'paper', phase 0)."
            )
        return m.build(sources, head=None, out_channels=None, example_input=example, align_data=data)
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


def without_ddp(network: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper; any other network as it is."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return network.module if isinstance(network, wrappers) else network


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
        checkpoint: the best phase-1 checkpoint (a state dict of ``merge``, as :class:`BestState` writes it);
            ``None`` uses ``merge`` as it is.
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
    merge = without_ddp(merge)
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
        problems = state_dict_diff(network_def, plain.state_dict(), source="the collapsed merge")
        if problems:
            raise ValueError(
                f"the collapsed merge ({type(plain).__name__}) does not fit network_def "
                f"({type(network_def).__name__}): set network_def to the sources' architecture with the target's "
                f"number of classes. {'; '.join(problems)}"
            )
        network_def.load_state_dict(plain.state_dict(), strict=True)
        plain = network_def
    plain = plain.to(device)
    if loader is not None:
        recalibrate_norm(plain, loader, device=device, max_batches=max_batches)
    return plain


class ClassificationScore(Metric):
    """One classification score as an Ignite metric, computed over the whole epoch from class scores.

    ``score`` is one of ``macro_f1`` (the primary metric), ``accuracy``, ``balanced_accuracy`` or ``auroc``
    (macro one-vs-rest; see :func:`~monai_medmerge.workflows.metrics.classification_metrics`). Under
    torch.distributed the predictions of every process are gathered first, so every rank reports the same value. The
    engine output is turned into ``(pred, label)`` by ``output_transform`` (default:
    ``monai.handlers.from_engine(["pred", "label"])``); ``pred`` holds probabilities or logits per item, ``label`` a
    class index or a one-hot vector; batched tensors and decollated lists both work.

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
        pred = torch.stack([_plain_tensor(p) for p in pred]) if isinstance(pred, (list, tuple)) else pred
        label = torch.stack([_plain_tensor(v) for v in label]) if isinstance(label, (list, tuple)) else label
        pred = _plain_tensor(pred).detach().float().cpu().reshape(len(pred), -1)
        label = _plain_tensor(label).detach().cpu()
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


def _plain_tensor(x: Any) -> torch.Tensor:
    """A plain ``torch.Tensor`` (a MONAI ``MetaTensor`` without its metadata, which gathering and slicing trip on)."""
    x = torch.as_tensor(x)
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def _rank0() -> bool:
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not dist or torch.distributed.get_rank() == 0


def _state(obj: Any) -> Any:
    return without_ddp(obj).state_dict() if isinstance(obj, nn.Module) else obj.state_dict()


def save_states(objects: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the state dicts of ``objects`` to ``path`` atomically (a kill leaves the old file or the new one).

    One object is written as its bare state dict (what ``load_state_dict`` and exported bundles expect), several as
    ``{name: state dict}`` (what ``monai.handlers.CheckpointLoader`` reads). Networks are unwrapped from
    DistributedDataParallel first.
    """
    states = {name: _state(obj) for name, obj in objects.items()}
    data = next(iter(states.values())) if len(states) == 1 else states
    with atomic_write(path, "wb") as f:
        torch.save(data, f)
    return Path(path)


_EPOCH = re.compile(r"_checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str) -> Path | None:
    """The newest ``{prefix}_checkpoint_epoch=N.pt`` in ``ckpt_dir`` (the highest N), or ``None``."""
    found = []
    for p in Path(ckpt_dir).glob(f"{prefix}_checkpoint_epoch=*.pt"):
        m = _EPOCH.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


class ResumableCheckpoint:
    """Periodic checkpoints of a phase and, with ``resume``, continuing from the latest one.

    At the end of every ``interval`` epochs it saves ``save_dict`` plus the trainer itself (its epoch and
    iteration) as ``{prefix}_checkpoint_epoch=N.pt`` in ``ckpt_dir`` (written atomically; only process 0 writes
    under torch.distributed); older files of the phase are deleted only after the new one is complete, so a run
    killed at any moment leaves a whole checkpoint. With ``resume`` true, when the trainer starts it restores the
    newest such file (MONAI ``CheckpointLoader``, ``weights_only`` loading), so the trainer continues with the next
    epoch; without a checkpoint it starts from the beginning. The trainer is the engine the handler is attached to.

    Args:
        ckpt_dir: folder of the checkpoints.
        prefix: file prefix of this phase (``"phase1"``, ``"phase2"``).
        save_dict: objects to save and restore, e.g. ``{"model": network, "optimizer": optimizer}``.
        resume: continue from the latest checkpoint if there is one.
        interval: save every this many epochs.
        map_location: passed to ``torch.load``.

    Raises:
        ValueError: when ``save_dict`` holds ``"trainer"`` (the engine is added) or ``interval`` < 1; when the
            trainer starts, for a checkpoint that cannot be restored (damaged, or not of these objects): the message
            names the file and says what to do.
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
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
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
        if _rank0():
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self._save, objects)

    def _save(self, engine, objects) -> None:
        path = self.ckpt_dir / f"{self.prefix}_checkpoint_epoch={engine.state.epoch}.pt"
        save_states(objects, path)
        for old in self.ckpt_dir.glob(f"{self.prefix}_checkpoint_epoch=*.pt"):
            if old != path and _EPOCH.search(old.name):
                old.unlink(missing_ok=True)

    def _restore(self, engine, objects) -> None:
        if not self.resume:
            return
        path = latest_checkpoint(self.ckpt_dir, self.prefix)
        if path is None:
            logger.info(f"resume: no {self.prefix} checkpoint in {self.ckpt_dir}; starting from the beginning")
            return
        from monai.handlers import CheckpointLoader

        try:
            CheckpointLoader(load_path=str(path), load_dict=objects, map_location=self.map_location)(engine)
        except Exception as e:  # torch and Ignite say "failed finding central directory", not which file or why
            # their first sentence says what failed; torch's further advice (weights_only=False) is not for a resume
            reason = re.split(r"(?<=\.)\s", " ".join(str(e).split()), maxsplit=1)[0][:300]
            raise ValueError(
                f"{path}: cannot resume {self.prefix} from this checkpoint ({type(e).__name__}: {reason}); if the "
                f"file is damaged (cut short by a full disk or an interrupted copy), delete it to run {self.prefix} "
                "from its beginning, or run without --resume to start over"
            ) from e
        self.loaded = path
        logger.info(f"resume: {self.prefix} continues after epoch {engine.state.epoch} from {path}")


class BestState:
    """Keep the network's state of the best validation score: in memory (restored when the trainer completes, so
    the network ends in its best state) and, with ``path``, in a file (process 0 only, written atomically).

    Attached to the evaluator, it acts when MONAI's evaluator has just recorded a new best key metric
    (``state.best_metric_epoch`` equals the epoch that ran); it also copies the best score and epoch into the
    trainer's state, so that handlers of the trainer (e.g. :class:`PhaseMarker`) report the validation best. Beside
    ``path`` it records the score, the epoch and a SHA-256 of the state file (``<path>.best.json``), so that a resume
    trusts a record only together with the very file it describes.

    Args:
        network: the network whose state is kept (possibly DistributedDataParallel; the file holds the bare state).
        trainer: the trainer of the phase.
        path: a file for the best state (``None``: none).
        restore: load the best state into ``network`` when the trainer completes.
    """

    def __init__(
        self, network: nn.Module, trainer, path: str | os.PathLike | None = None, restore: bool = True
    ) -> None:
        self.network = network
        self.trainer = trainer
        self.path = None if path is None else Path(path)
        self.restore = bool(restore)
        self.best: dict[str, torch.Tensor] | None = None

    def attach(self, evaluator) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)
        if self.restore:
            self.trainer.add_event_handler(Events.COMPLETED, self._restore)

    def __call__(self, evaluator) -> None:
        state = evaluator.state
        self.trainer.state.best_metric = state.best_metric
        self.trainer.state.best_metric_epoch = state.best_metric_epoch
        if state.best_metric_epoch != state.epoch:
            return
        if self.restore:
            self.best = copy.deepcopy(without_ddp(self.network).state_dict())
        if self.path is not None and _rank0():
            save_states({"network": self.network}, self.path)
            info = {
                "best_metric": _plain(state.best_metric),
                "best_metric_epoch": int(state.best_metric_epoch),
                "state_sha256": _sha256(self.path),
            }
            write_json(self._info_path(), info, indent=None)

    def _info_path(self) -> Path:
        return self.path.with_name(self.path.name + ".best.json")

    def _record(self) -> dict | None:
        """The best-score record if it describes the state file now at ``path``; ``None`` (with a warning saying
        why) when it is unreadable or belongs to another version of the file (a kill between the two writes)."""
        info_path = self._info_path()
        try:
            info = json.loads(info_path.read_text())
            if not isinstance(info, dict):
                raise ValueError(f"expected a JSON object, got {type(info).__name__}")
            record = {
                "best_metric": float(info["best_metric"]),
                "best_metric_epoch": int(info["best_metric_epoch"]),
                "state_sha256": str(info["state_sha256"]),
            }
        except (OSError, ValueError, TypeError, KeyError) as e:
            reason = f"no field {e}" if isinstance(e, KeyError) else str(e)
            logger.warning(f"resume: {info_path} is unreadable ({reason}); the best score restarts from here")
            return None
        if _sha256(self.path) != record["state_sha256"]:
            logger.warning(
                f"resume: {self.path} is not the state that {info_path} records (it was replaced after the record "
                "was written); the best score restarts from here"
            )
            return None
        return record

    def resume(self, evaluator, checkpoint: ResumableCheckpoint, early_stop: Any = None, val_interval: int = 1) -> None:
        """After ``checkpoint`` restored a phase, continue its best-metric tracking: the best score and epoch go
        back into ``evaluator`` and the best state (from ``path``) into memory, so a resumed epoch replaces the
        best only when it beats it, and the phase still ends in its best state. With ``early_stop`` (Ignite
        ``EarlyStopping`` on the evaluator, validating every ``val_interval`` epochs) its count of validations
        without improvement continues too, and a phase that had already run out of patience stops at once.
        Attached by :func:`phase_trainer` to the trainer's start, after the checkpoint's own restore.

        A best-score record newer than the checkpoint, unreadable, or not matching the state file is not used: the
        phase then tracks its best (and its patience) from the resumed epoch on, with a warning for the last two.
        """

        def _resume(trainer) -> None:
            if checkpoint.loaded is None or self.path is None:
                return
            if not (self.path.is_file() and self._info_path().is_file()):
                return
            info = self._record()
            if info is None:
                return
            best, best_epoch = info["best_metric"], info["best_metric_epoch"]
            if best_epoch > int(trainer.state.epoch):
                return  # written after the checkpoint the phase resumed from: not part of the run's past
            if self.restore:
                try:
                    self.best = torch.load(self.path, map_location="cpu", weights_only=True)
                except Exception as e:  # the digest matched, so only a read error gets here
                    logger.warning(f"resume: cannot read {self.path} ({e}); the best score restarts from here")
                    return
            evaluator.state.best_metric, evaluator.state.best_metric_epoch = best, best_epoch
            trainer.state.best_metric, trainer.state.best_metric_epoch = best, best_epoch
            logger.info(f"resume: best validation score so far {best:.4f} (epoch {best_epoch})")
            if early_stop is None:
                return
            # validations run at the multiples of val_interval; those after the best one did not improve on it
            waited = int(trainer.state.epoch) // int(val_interval) - best_epoch // int(val_interval)
            early_stop.best_score, early_stop.counter = best, waited
            if waited >= early_stop.patience:
                logger.info(f"resume: {waited} validations without improvement (patience {early_stop.patience})")
                trainer.terminate()  # it had stopped early; the kill came before its marker

        self.trainer.add_event_handler(Events.STARTED, _resume)

    def _restore(self, _engine) -> None:
        if self.best is not None:
            without_ddp(self.network).load_state_dict(self.best)


class PhaseMarker:
    """Write ``path`` (JSON: epochs run, best validation score) when a phase completes, including after early
    stopping, so that a resumed run skips a finished phase. Written atomically.

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
        if self.rank0_only and not _rank0():
            return
        state = engine.state
        info = {
            "epochs": int(state.epoch),
            "iterations": int(state.iteration),
            "best_metric": _plain(getattr(state, "best_metric", None)),
            "best_metric_epoch": _plain(getattr(state, "best_metric_epoch", None)),
        }
        write_json(self.path, info, indent=None)


def _plain(v):
    if isinstance(v, (np.floating, np.integer, torch.Tensor)):
        return v.item()
    return v


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


RUN_FILE = "run.json"
# what a fresh run removes from the checkpoint folder: the state of an earlier run that a resume would trust
_STALE_PATTERNS = ("phase*.done", "phase*_checkpoint_epoch=*.pt", "*.best.json")


def _file_stamps(path: Path) -> list:
    """Name, size and modification time of a source's files (a replaced checkpoint changes the fingerprint)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]


def run_fingerprint(settings: Mapping[str, Any], sources: Sequence[Any] = ()) -> str:
    """A short hash of what a training run depends on: ``settings`` (plain values: data items, classes, network,
    preprocessing, merge and optimiser settings) and the files of ``sources`` (paths, or specs with a
    ``checkpoint``), by name, size and modification time."""
    import hashlib

    stamps = []
    for spec in sources:
        target = spec.get("checkpoint") if isinstance(spec, Mapping) else spec
        stamps.append(_file_stamps(Path(str(target))) if target is not None else [])
    text = json.dumps({"settings": settings, "sources": stamps}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def start_run(ckpt_dir: str | os.PathLike, resume: bool, fingerprint: str) -> str:
    """Begin a training run in ``ckpt_dir``, or continue the one recorded there; returns the fingerprint.

    A fresh run (``resume`` false) writes ``run.json`` with its ``fingerprint`` and removes the phase markers,
    periodic checkpoints and best-score records of an earlier run (``phase*.done``, ``phase*_checkpoint_epoch=*.pt``,
    ``*.best.json``), so that a later ``resume`` can only continue this run, never skip a phase on an older run's
    marker; the older ``model.pt`` stays until this run replaces it. A resumed run continues only the run recorded
    in ``run.json``: with other settings, data or source files (another fingerprint), or an unreadable ``run.json``,
    it is refused before anything changes. Resuming where no run is recorded starts a fresh one; files of an earlier
    run found there are not trusted (nothing says which run they belong to) and are removed, with a warning that
    names them. Both kinds of start remove the temporary files that a killed run's interrupted writes left behind.
    Under torch.distributed only process 0 writes.

    Raises:
        ValueError: when ``resume`` is true and ``run.json`` records another fingerprint or cannot be read (the
            message names the file and says how to start over).
    """
    folder = Path(ckpt_dir)
    run_file = folder / RUN_FILE
    if resume and run_file.is_file():
        recorded = _recorded_fingerprint(run_file)
        if recorded != fingerprint:
            raise ValueError(
                f"{run_file}: the run recorded there had other settings, data or sources (fingerprint {recorded} "
                f"here {fingerprint}); resume continues only that run: run without --resume to start over"
            )
        logger.info(f"resume: continuing the run recorded in {run_file}")
        if _rank0():
            _remove_interrupted_writes(folder)
        return fingerprint
    stale = sorted({p for pattern in _STALE_PATTERNS for p in folder.glob(pattern)})
    if resume and stale:
        names = ", ".join(p.name for p in stale[:4]) + (", ..." if len(stale) > 4 else "")
        logger.warning(
            f"resume: {folder} holds {len(stale)} file(s) of an earlier run ({names}) but no {RUN_FILE} to say "
            "which run they belong to; they are not trusted: starting a fresh run, which removes them"
        )
    elif resume:
        logger.info(f"resume: no run is recorded in {folder}; starting a fresh run")
    if _rank0():
        folder.mkdir(parents=True, exist_ok=True)
        _remove_interrupted_writes(folder)
        for path in stale:
            path.unlink(missing_ok=True)
        write_json(run_file, {"fingerprint": fingerprint}, indent=None)
    return fingerprint


def _recorded_fingerprint(run_file: Path) -> str:
    try:
        info = json.loads(run_file.read_text())
    except (OSError, UnicodeDecodeError) as e:
        reason = str(e)
    except ValueError as e:
        reason = f"not valid JSON: {e}"
    else:
        if isinstance(info, dict) and isinstance(info.get("fingerprint"), str):
            return info["fingerprint"]
        reason = "it holds no 'fingerprint'"
    raise ValueError(
        f"{run_file}: cannot tell which run it records ({reason}), so resume cannot check that the files there "
        "belong to this run: run without --resume to start over"
    )


# the temporary name that monai_medmerge.io.atomic_write gives a file before renaming it (tempfile.mkstemp)
_INTERRUPTED_WRITE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _remove_interrupted_writes(folder: Path) -> None:
    """Remove what writes cut short by a kill left in ``folder``: never-renamed temporary files, possibly large."""
    for path in folder.glob(".*.tmp"):
        if _INTERRUPTED_WRITE.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            logger.info(f"removed {path}, a file whose writing was interrupted")


def phase_completed(marker: str | os.PathLike, resume: bool) -> bool:
    """Whether a resumed run may skip the phase whose :class:`PhaseMarker` is ``marker``."""
    done = bool(resume) and Path(marker).is_file()
    if done:
        logger.info(f"resume: {marker} says this phase completed earlier; skipping it")
    return done


def _scores_of_logits(output: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.softmax(output["pred"].float(), dim=1), output["label"]


def _label_maps(output: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """The predicted label map (argmax over the class channels) and the true one, both ``(batch, 1, *spatial)``."""
    pred, label = output["pred"], output["label"]
    pred = torch.stack([_plain_tensor(p) for p in pred]) if isinstance(pred, (list, tuple)) else _plain_tensor(pred)
    label = torch.stack([_plain_tensor(v) for v in label]) if isinstance(label, (list, tuple)) else _plain_tensor(label)
    if label.ndim == pred.ndim - 1:
        label = label.unsqueeze(1)
    return pred.argmax(1, keepdim=True), label.round().long()


TASKS = ("classification", "segmentation")
KEY_METRICS = {"classification": "macro_f1", "segmentation": "mean_dice"}


def check_task(task: str) -> str:
    """``task`` if it is one of :data:`TASKS`, else a ``ValueError`` that lists them."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
    return task


def check_training(**settings: Any) -> None:
    """Check a bundle's training settings, by their config names, before any phase trains (the bundles call it in
    ``initialize``): a bad value would otherwise surface only when its phase starts, after the earlier phases'
    hours, or not at all (Adam takes a negative learning rate of a parameter group and ascends).

    Names ending in ``_epochs`` (``phase0_head_epochs`` may be 0), ``batch_size``, ``val_interval`` and
    ``sw_batch_size`` take integers >= 1; names ending in ``_lr`` numbers >= 0; ``patience`` an integer >= 1 or
    None; ``sw_overlap`` a number in [0, 1).

    Raises:
        ValueError: naming the first setting that breaks its rule, with its value.
    """
    for name, value in settings.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        whole = number and float(value).is_integer()
        if name == "patience":
            ok, rule = value is None or (whole and value >= 1), "an integer >= 1, or null for no early stopping"
        elif name == "sw_overlap":
            ok, rule = number and 0 <= value < 1, "a number in [0, 1)"
        elif name.endswith("_lr"):  # 0 (nothing moves) is allowed, as torch's optimizers allow it
            ok, rule = number and value >= 0, "a number >= 0"
        elif name.endswith("_epochs") or name in ("batch_size", "val_interval", "sw_batch_size"):
            least = 0 if name == "phase0_head_epochs" else 1
            ok, rule = whole and value >= least, f"an integer >= {least}"
        else:
            raise ValueError(f"check_training: no rule for the setting {name!r}.")
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {value!r}.")


def default_loss(task: str = "classification") -> nn.Module:
    """The training loss of a task: cross-entropy for classification; for segmentation MONAI's ``DiceCELoss``
    (softmax over the class channels, the label map one-hot encoded), the usual loss of MONAI's segmentation bundles."""
    if check_task(task) == "segmentation":
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)
    return nn.CrossEntropyLoss()


def phase_evaluator(
    network: nn.Module,
    val_data_loader: Iterable,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    val_handlers: Sequence | None = None,
    prefix: str = "val",
    inferer: Any = None,
    prepare_batch: Callable = default_prepare_batch,
    amp: bool = False,
    task: str = "classification",
) -> SupervisedEvaluator:
    """The validation engine of a phase: a MONAI ``SupervisedEvaluator`` over the whole loader.

    Classification: ``{prefix}_macro_f1`` is the key metric, with ``{prefix}_accuracy``,
    ``{prefix}_balanced_accuracy`` and ``{prefix}_auroc`` beside it, computed from the softmax of the network's
    outputs. Segmentation: ``{prefix}_mean_dice`` is the key metric, MONAI's ``MeanDice`` of the predicted label map
    (argmax over the class channels) against the true one, averaged over the foreground labels (background, label
    0, left out) and the images; an image without a label and without its prediction does not count for that label.

    Args:
        network: the network to validate (the trainer's network).
        val_data_loader: validation batches: dicts with ``image``/``label`` or ``(image, label)`` pairs.
        device: where to run.
        num_classes: classes of the task, background included for segmentation (default: the width of the
            network's output).
        val_handlers: more handlers of the evaluator (statistics, TensorBoard).
        prefix: name prefix of the metrics.
        inferer: a MONAI inferer (default: ``SimpleInferer``; for segmentation of whole images usually a
            ``SlidingWindowInferer`` with the training patch size).
        prepare_batch: how a batch becomes ``(input, label)`` (MONAI's default reads both batch forms above).
        amp: automatic mixed precision.
        task: ``"classification"`` or ``"segmentation"``.

    Raises:
        ValueError: for an unknown ``task``, or a segmentation task without ``num_classes``.
    """
    if check_task(task) == "segmentation":
        from monai.handlers import MeanDice

        if num_classes is None:
            raise ValueError("phase_evaluator(task='segmentation') needs num_classes (background included).")
        metrics = {
            f"{prefix}_mean_dice": MeanDice(include_background=False, num_classes=int(num_classes),
                                            output_transform=_label_maps, save_details=False)
        }  # fmt: skip
    else:
        metrics = {
            f"{prefix}_{score}": ClassificationScore(score, num_classes, output_transform=_scores_of_logits)
            for score in SCORES
        }
    key = f"{prefix}_{KEY_METRICS[task]}"
    return SupervisedEvaluator(
        device=device,
        val_data_loader=val_data_loader,
        network=network,
        inferer=inferer,
        prepare_batch=prepare_batch,
        key_val_metric={key: metrics.pop(key)},
        additional_metrics=metrics or None,
        val_handlers=list(val_handlers or []),
        amp=amp,
        decollate=False,
    )


def phase_trainer(
    network: nn.Module,
    train_data_loader: Iterable,
    evaluator: SupervisedEvaluator,
    optimizer: torch.optim.Optimizer,
    max_epochs: int,
    device: torch.device | str = "cpu",
    loss_function: Callable | None = None,
    patience: int | None = None,
    val_interval: int = 1,
    best_path: str | os.PathLike | None = None,
    restore_best: bool = True,
    checkpoint: ResumableCheckpoint | None = None,
    train_handlers: Sequence | None = None,
    progress: bool = True,
    desc: str = "train",
    prepare_batch: Callable = default_prepare_batch,
    amp: bool = False,
    epoch_length: int | None = None,
) -> SupervisedTrainer:
    """The training engine of a phase (phase 1, phase 2 or a fine-tuning baseline), with its semantics attached.

    A MONAI ``SupervisedTrainer`` that, in this order at the end of every ``val_interval`` epochs: runs
    ``evaluator``; keeps the network's state of the best validation key metric (:class:`BestState`, restored when
    the phase completes; also written to ``best_path``); stops after ``patience`` validations without improvement
    (Ignite ``EarlyStopping``); saves ``checkpoint`` (after validation, so a checkpoint includes its epoch's
    validation). A progress bar labelled ``desc`` shows the epochs when ``progress``. ``train_handlers`` come last.
    A phase resumed from ``checkpoint`` keeps its best score and state and its count of validations without
    improvement (:meth:`BestState.resume`).

    Args:
        network: the network to train (possibly DistributedDataParallel).
        train_data_loader: training batches: dicts with ``image``/``label`` or ``(image, label)`` pairs.
        evaluator: the validation engine (:func:`phase_evaluator`) of the same network.
        optimizer: the optimizer (Adam over :func:`merge_parameter_groups` in phase 1).
        max_epochs: the most epochs to run.
        device: where to train.
        loss_function: ``loss(pred, label)``; default cross-entropy (:func:`default_loss` gives a task's loss).
        patience: stop after this many validations without improvement (``None``: run every epoch).
        val_interval: validate every this many epochs.
        best_path: a file for the best state (process 0 writes it).
        restore_best: load the best state into ``network`` when the phase completes.
        checkpoint: periodic checkpoints and resuming (:class:`ResumableCheckpoint`).
        train_handlers: more handlers of the trainer (markers, statistics, TensorBoard).
        progress: show a progress bar.
        desc: the progress bar's label: say what is trained, e.g. ``"phase 2: fine-tune (MedMerge)"``.
        prepare_batch: how a batch becomes ``(input, label)``.
        amp: automatic mixed precision.
        epoch_length: training steps per epoch (``None``: one pass over ``train_data_loader``; more restarts it
            as needed, as Ignite does).

    Raises:
        ValueError: when ``max_epochs``, ``patience`` or ``val_interval`` is below 1, a parameter group's learning
            rate is negative, or ``val_interval`` is above ``max_epochs`` (no validation: no best state, and
            ``best_path`` would keep an earlier run's file).
    """
    from monai.handlers import ValidationHandler

    if int(max_epochs) < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
    if patience is not None and int(patience) < 1:
        raise ValueError(f"patience must be >= 1 or None, got {patience}.")
    if int(val_interval) < 1:
        raise ValueError(f"val_interval must be >= 1, got {val_interval}.")
    for i, group in enumerate(optimizer.param_groups):  # torch checks only the optimizer's default lr
        if not float(group.get("lr", 0.0)) >= 0:
            raise ValueError(f"the learning rate of parameter group {i} must be >= 0, got {group['lr']}.")
    if int(val_interval) > int(max_epochs):
        raise ValueError(
            f"val_interval {val_interval} is above max_epochs {max_epochs}: the phase would never validate, so it "
            "would have no best state; set val_interval to at most max_epochs."
        )
    if epoch_length is not None and int(epoch_length) < 1:
        raise ValueError(f"epoch_length must be >= 1 or None (one pass over the training data), got {epoch_length}.")
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=int(max_epochs),
        train_data_loader=train_data_loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss_function if loss_function is not None else nn.CrossEntropyLoss(),
        prepare_batch=prepare_batch,
        amp=amp,
        decollate=False,
        optim_set_to_none=True,
        epoch_length=None if epoch_length is None else int(epoch_length),
    )
    ValidationHandler(interval=int(val_interval), validator=evaluator, epoch_level=True).attach(trainer)
    best = BestState(network, trainer, best_path, restore=restore_best)
    best.attach(evaluator)
    early_stop = None
    if patience is not None:
        early_stop = EarlyStopping(patience=int(patience), score_function=_key_metric, trainer=trainer)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, early_stop)
    if checkpoint is not None:
        checkpoint.attach(trainer)
        # after the checkpoint's restore: handlers run in the order attached
        best.resume(evaluator, checkpoint, early_stop=early_stop, val_interval=int(val_interval))
    if progress:
        ProgressBar(desc=desc, persist=False).attach(trainer, output_transform=_loss_of)
    for handler in train_handlers or []:
        handler.attach(trainer)
    return trainer


def _key_metric(engine) -> float:
    return float(engine.state.metrics[engine.state.key_metric_name])


def _loss_of(output) -> dict[str, float]:
    loss = output["loss"] if isinstance(output, Mapping) else output[0]["loss"]
    return {"loss": float(loss.detach())}
