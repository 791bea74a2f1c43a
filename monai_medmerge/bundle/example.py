"""A small, complete example workspace for the training bundle: target images as NIfTI files with a datalist, and
two source bundles pretrained here on two other tasks from different initialisations. Offline, a minute on CPU."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from monai_medmerge.data.synthetic import TASKS, make_blob_dataset
from monai_medmerge.io import atomic_folder, write_json
from monai_medmerge.sources import save_checkpoint
from monai_medmerge.workflows import fit

__all__ = ["example_network_def", "make_example", "make_segmentation_example", "segmentation_network_def"]

TARGET = "count_size"
CLASS_NAMES = ["one small", "one large", "five small", "five large"]
SOURCE_TASKS = {"a": "count", "b": "size"}


def example_network_def(num_classes: int, widths: Sequence[int] = (16, 32, 64, 128)) -> dict:
    """The MONAI ResNet config the example (and ``bundles/medmerge_classification``) uses."""
    return {
        "_target_": "monai.networks.nets.ResNet",
        "block": "basic",
        "layers": [1, 1, 1, 1],
        "block_inplanes": [int(w) for w in widths],
        "spatial_dims": 2,
        "n_input_channels": 1,
        "conv1_t_size": 3,
        "conv1_t_stride": 1,
        "no_max_pool": True,
        "num_classes": int(num_classes),
    }


def _write_nifti(path: Path, image: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(path))


def _write_images(folder: Path, base: Path, ds, prefix: str) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (x, y) in enumerate(ds):
        path = folder / f"{prefix}_{i:04d}.nii.gz"
        _write_nifti(path, x[0].numpy())
        items.append({"image": os.path.relpath(path, base), "label": int(y)})
    return items


def _pretrained(
    net_def: dict, init_seed: int, train, val, lr: float, epochs: int, progress: bool, what: str, **fit_args
) -> torch.nn.Module:
    """A source network: ``net_def`` built from its own random initialisation (``init_seed``) and trained with
    :func:`~monai_medmerge.workflows.fit`; returned in eval mode."""
    from monai.bundle import ConfigParser

    torch.manual_seed(init_seed)
    net = ConfigParser({"n": net_def}).get_parsed_content("n")
    fit(net, train, val, [{"params": net.parameters(), "lr": lr}], epochs, progress=progress, desc=f"source {what}",
        **fit_args)  # fmt: skip
    return net.eval()


def _source_bundle(folder: Path, net: torch.nn.Module, network_def: dict, task: str) -> None:
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    save_checkpoint(net, folder / "models" / "model.pt")
    config = {"network_def": network_def, "task": f"synthetic blob task {task!r}"}
    write_json(folder / "configs" / "inference.json", config)


def make_example(
    out_dir: str | os.PathLike,
    k: int = 16,
    test_per_class: int = 25,
    image_size: int = 32,
    source_epochs: int = 3,
    widths: Sequence[int] = (16, 32, 64, 128),
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write an example workspace for ``bundles/medmerge_classification`` into ``out_dir``.

    ``out_dir/data/datalist.json`` lists ``training``/``validation``/``test`` NIfTI images (2-D, ``image_size``
    pixels) of the 4-class target task (how many discs and how large); ``out_dir/sources/a`` and ``sources/b`` are
    bundle folders (``configs/inference.json`` with ``network_def``, ``models/model.pt``) of the same MONAI ResNet
    pretrained on two other tasks (disc count; disc size), each from its own random initialisation.

    Args:
        out_dir: the workspace folder; written under a temporary name and renamed into place.
        k: target training images per class (as many again for validation).
        test_per_class: target test images per class.
        image_size: image side in pixels.
        source_epochs: pretraining epochs of each source.
        widths: channel widths of the ResNet's four stages.
        seed: seed of images, initialisations and training.
        overwrite: replace an existing ``out_dir``.
        progress: progress bars while pretraining.

    Returns:
        ``{"root", "datalist", "sources", "class_names", "network_def", "spatial_size"}``.

    Raises:
        FileExistsError: when ``out_dir`` exists and ``overwrite`` is False.
        NotADirectoryError: when ``out_dir`` is a file or a symbolic link.
    """
    out = Path(out_dir)
    with atomic_folder(out, overwrite, what="example folder") as tmp:
        for i, (name, task) in enumerate(SOURCE_TASKS.items()):
            net_def = example_network_def(TASKS[task].num_classes, widths)
            g = torch.Generator().manual_seed(seed + i)
            train = DataLoader(make_blob_dataset(task, 150, seed + 11 * i, image_size), 32, shuffle=True, generator=g)
            val = DataLoader(make_blob_dataset(task, 30, seed + 11 * i + 5, image_size), 64)
            net = _pretrained(
                net_def, seed + 101 * (i + 1), train, val, 1e-3, source_epochs, progress, f"{name} ({task})"
            )
            _source_bundle(tmp / "sources" / name, net, net_def, task)
        data = tmp / "data"
        splits = {
            "training": make_blob_dataset(TARGET, k, seed + 1000, image_size),
            "validation": make_blob_dataset(TARGET, k, seed + 2000, image_size),
            "test": make_blob_dataset(TARGET, test_per_class, seed + 3000, image_size),
        }
        datalist = {
            "description": "synthetic discs: one or five, small or large (monai_medmerge example)",
            "labels": {str(i): c for i, c in enumerate(CLASS_NAMES)},
            **{name: _write_images(data / "images" / name, data, ds, name) for name, ds in splits.items()},
        }
        write_json(data / "datalist.json", datalist)
    return {
        "root": str(out),
        "datalist": str(out / "data" / "datalist.json"),
        "sources": [str(out / "sources" / n) for n in SOURCE_TASKS],
        "class_names": list(CLASS_NAMES),
        "network_def": example_network_def(len(CLASS_NAMES), widths),
        "spatial_size": [image_size, image_size],
    }


# --- a segmentation workspace (bundles/medmerge_segmentation) --------------------------------------------------------
# Images of discs of random brightness (MONAI's create_test_image_2d). Source a outlines the discs (background,
# disc); source b tells three brightness bands apart; the target wants two bands of the discs, which needs both.
SEGMENTATION_SOURCES = {"a": 1, "b": 3}  # source -> brightness bands labelled (label maps with bands + 1 values)
SEGMENTATION_LABELS = ["background", "dim disc", "bright disc"]


def segmentation_network_def(num_classes: int, widths: Sequence[int] = (16, 32, 64, 128)) -> dict:
    """The MONAI UNet config the segmentation example (and ``bundles/medmerge_segmentation``) uses."""
    return {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": int(num_classes),
        "channels": [int(w) for w in widths],
        "strides": [2] * (len(widths) - 1),
        "num_res_units": 2,
    }


def _disc_images(n: int, bands: int, seed: int, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    from monai.data.synthetic import create_test_image_2d

    rng = np.random.RandomState(seed)
    pairs = [
        create_test_image_2d(*shape, num_objs=6, rad_max=12, rad_min=4, noise_max=0.3, num_seg_classes=bands,
                             random_state=rng)
        for _ in range(n)
    ]  # fmt: skip
    images = np.stack([p[0] for p in pairs]).astype(np.float32)[:, None]
    labels = np.stack([p[1] for p in pairs]).astype(np.int64)[:, None]
    return images, labels


def _write_pairs(folder: Path, base: Path, n: int, seed: int, prefix: str) -> list[dict]:
    """``n`` target image/label-map pairs as 2-D NIfTI files of assorted sizes (a 1.5 mm grid)."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    items = []
    for i in range(n):
        shape = (int(rng.randint(56, 97)), int(rng.randint(56, 97)))
        image, label = _disc_images(1, len(SEGMENTATION_LABELS) - 1, seed * 1000 + i, shape)
        affine = np.diag([1.5, 1.5, 1.5, 1.0])
        paths = {}
        for key, array, dtype in (("image", image[0, 0], np.float32), ("label", label[0, 0], np.uint8)):
            path = folder / f"{prefix}_{i:04d}_{key}.nii.gz"
            nib.save(nib.Nifti1Image(array.astype(dtype), affine), str(path))
            paths[key] = os.path.relpath(path, base)
        items.append(paths)
    return items


def make_segmentation_example(
    out_dir: str | os.PathLike,
    n_train: int = 12,
    n_test: int = 8,
    image_size: int = 64,
    source_epochs: int = 3,
    widths: Sequence[int] = (16, 32, 64, 128),
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write an example workspace for ``bundles/medmerge_segmentation`` into ``out_dir``.

    ``out_dir/data/datalist.json`` lists ``training``/``validation``/``test`` pairs ``{"image", "label"}`` of 2-D
    NIfTI files (images of assorted sizes, 56 to 96 pixels a side, each label map with its image's affine) of the
    target task: discs split into dim and bright ones (labels background, dim disc, bright disc).
    ``out_dir/sources/a`` and ``sources/b`` are bundle folders of the same MONAI UNet pretrained on two other
    tasks (discs against background; three brightness bands), each from its own random initialisation.

    Args:
        out_dir: the workspace folder; written under a temporary name and renamed into place.
        n_train: target training pairs (as many again for validation).
        n_test: target test pairs.
        image_size: side of the sources' pretraining images.
        source_epochs: pretraining epochs of each source.
        widths: channels of the UNet's levels.
        seed: seed of images, initialisations and training.
        overwrite: replace an existing ``out_dir``.
        progress: progress bars while pretraining.

    Returns:
        ``{"root", "datalist", "sources", "label_names", "network_def"}``.

    Raises:
        FileExistsError: when ``out_dir`` exists and ``overwrite`` is False.
        NotADirectoryError: when ``out_dir`` is a file or a symbolic link.
    """
    from torch.utils.data import TensorDataset

    out = Path(out_dir)
    with atomic_folder(out, overwrite, what="example folder") as tmp:
        for i, (name, bands) in enumerate(SEGMENTATION_SOURCES.items()):
            net_def = segmentation_network_def(bands + 1, widths)
            shape = (image_size, image_size)
            data = [torch.as_tensor(a) for a in _disc_images(96, bands, seed + 11 * i, shape)]
            val = [torch.as_tensor(a) for a in _disc_images(16, bands, seed + 11 * i + 5, shape)]
            g = torch.Generator().manual_seed(seed + i)
            train = DataLoader(TensorDataset(*data), 16, shuffle=True, generator=g)
            desc = f"{name} ({bands} brightness band(s))"
            net = _pretrained(
                net_def, seed + 101 * (i + 1), train, DataLoader(TensorDataset(*val), 16), 3e-3, source_epochs,
                progress, desc, task="segmentation", num_classes=bands + 1,
            )  # fmt: skip
            _source_bundle(tmp / "sources" / name, net, net_def, f"discs, {bands} band(s)")
        data = tmp / "data"
        datalist = {
            "description": "synthetic discs, dim or bright (monai_medmerge segmentation example)",
            "labels": {str(i): c for i, c in enumerate(SEGMENTATION_LABELS)},
            "training": _write_pairs(data / "images", data, n_train, seed + 1000, "training"),
            "validation": _write_pairs(data / "images", data, n_train, seed + 2000, "validation"),
            "test": _write_pairs(data / "images", data, n_test, seed + 3000, "test"),
        }
        write_json(data / "datalist.json", datalist)
    return {
        "root": str(out),
        "datalist": str(out / "data" / "datalist.json"),
        "sources": [str(out / "sources" / n) for n in SEGMENTATION_SOURCES],
        "label_names": list(SEGMENTATION_LABELS),
        "network_def": segmentation_network_def(len(SEGMENTATION_LABELS), widths),
    }
