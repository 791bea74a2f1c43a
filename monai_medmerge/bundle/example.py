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

__all__ = ["example_network_def", "make_example"]

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
        from monai.bundle import ConfigParser

        for i, (name, task) in enumerate(SOURCE_TASKS.items()):
            torch.manual_seed(seed + 101 * (i + 1))
            net_def = example_network_def(TASKS[task].num_classes, widths)
            net = ConfigParser({"n": net_def}).get_parsed_content("n")
            g = torch.Generator().manual_seed(seed + i)
            train = DataLoader(make_blob_dataset(task, 150, seed + 11 * i, image_size), 32, shuffle=True, generator=g)
            val = DataLoader(make_blob_dataset(task, 30, seed + 11 * i + 5, image_size), 64)
            fit(
                net,
                train,
                val,
                [{"params": net.parameters(), "lr": 1e-3}],
                epochs=source_epochs,
                progress=progress,
                desc=f"source {name} ({task})",
            )
            _source_bundle(tmp / "sources" / name, net.eval(), net_def, task)
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
