"""Export a collapsed network as a standard MONAI bundle that loads and runs without this package."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.bundle import ConfigParser
from torch import nn

import monai_medmerge
from monai_medmerge.bundle.inference import (
    MODALITY_METADATA,
    inference_config,
    input_description,
    pip_requirements,
    required_packages,
    runtime_versions,
    write_scripts,
)
from monai_medmerge.bundle.network_def import resolve_network_def
from monai_medmerge.data.datalist import check_class_names
from monai_medmerge.data.pipelines import preprocessing_config
from monai_medmerge.io import atomic_folder, check_folder_target
from monai_medmerge.sources import state_dict_diff

__all__ = ["export_bundle", "export_from_checkpoint", "SCHEMA_URL"]

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"

LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _plain_network_def(network_def: Mapping[str, Any]) -> dict[str, Any]:
    target = network_def.get("_target_") if isinstance(network_def, Mapping) else None
    if not isinstance(target, str) or not target:
        raise ValueError(
            f"network_def needs a full dotted '_target_' (e.g. 'monai.networks.nets.ResNet'), got {network_def!r}."
        )
    plain = resolve_network_def(network_def)
    target = plain["_target_"]
    if target.split(".")[0] == "monai_medmerge":
        raise ValueError(
            f"network_def '_target_' is {target!r}: an exported bundle must build a plain MONAI or torch network, "
            "so that it loads where monai_medmerge is not installed. Export the collapsed network."
        )
    return plain


def export_bundle(
    network: nn.Module,
    network_def: Mapping[str, Any],
    out_dir: str | os.PathLike,
    class_names: Sequence[str],
    spatial_shape: Sequence[int],
    in_channels: int = 1,
    name: str = "medmerge_classification",
    description: str = "",
    version: str = "0.1.0",
    value_range: Sequence[float] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    torchscript: bool = True,
    overwrite: bool = False,
    *,
    kind: str = "nifti",
    reader: str | None = None,
    modality: str = "other",
    window: Sequence[float] = (-1000.0, 1000.0),
    percentiles: Sequence[float] = (1.0, 99.0),
    pixdim: Sequence[float] | None = None,
    task: str = "classification",
    sw_batch_size: int = 4,
    sw_overlap: float = 0.25,
) -> Path:
    """Write ``network`` as a MONAI bundle folder that needs MONAI and torch, not this package.

    The bundle's preprocessing is the evaluation half of the training pipeline: the list that
    :func:`monai_medmerge.data.pipelines.preprocessing_config` makes from ``kind``, ``reader``, ``modality``,
    ``window``, ``percentiles``, ``pixdim``, ``spatial_shape`` and ``in_channels``, written as it is (pass the
    values the network was trained with). The package's own loading and checking transforms travel with the bundle
    in ``scripts/medmerge_transforms.py``, a copy of ``monai_medmerge/data/transforms.py``; what writes the
    predictions and lists unreadable inputs in ``scripts/medmerge_inference.py``, a copy of
    :mod:`monai_medmerge.bundle.shipped`.

    The folder holds ``configs/metadata.json`` (valid against MONAI's metadata schema, class names in
    ``network_data_format``, ``required_packages_version``: exactly what the inference needs besides torch, MONAI
    and numpy), ``configs/inference.yaml`` (a complete MONAI inference workflow: read images or DICOM series from
    ``dataset_dir``, preprocess, classify, write ``predictions.csv`` with a header row and ``unreadable.csv``),
    ``configs/logging.conf``,
    ``models/model.pt`` (a state dict), ``models/model.ts`` (TorchScript, when the network scripts),
    ``scripts/`` and ``docs/README.md``. Run it with ``python -m monai.bundle run --config_file configs/inference.yaml
    --bundle_root . --dataset_dir DIR --output_dir OUT``.

    The folder is assembled under a temporary name beside ``out_dir`` and renamed into place, so an interrupted
    export never leaves a half-written bundle. Before anything is written, ``network_def`` is instantiated and the
    weights are loaded into it strictly, and its outputs are compared with ``network``'s.

    Args:
        network: the plain network (e.g. ``KernelMerge.collapse()``), in any mode.
        network_def: MONAI config of the network's class, e.g. ``{"_target_": "monai.networks.nets.ResNet", ...}``;
            expressions are evaluated and a short ``_target_`` is expanded (see :func:`resolve_network_def`).
        out_dir: the bundle folder to create.
        class_names: one name per output class, in output order.
        spatial_shape: input spatial shape (e.g. ``[32, 32]``); inputs are resized to it.
        in_channels: input channels.
        name: bundle name (metadata ``name``).
        description: one paragraph for the metadata and README.
        version: bundle version.
        value_range: expected input intensity range for the metadata; ``None``: [0, 1] for CT and MR, [-4, 4] for
            normalised intensities.
        extra_metadata: more metadata fields (e.g. how the merge was made), merged at the top level.
        torchscript: also write ``models/model.ts`` when ``torch.jit.script`` succeeds.
        overwrite: replace an existing ``out_dir``.
        kind: the image kind of the training pipeline: ``"png"``, ``"nifti"``, ``"dicom"`` or ``"dicom_series"``.
        reader: the MONAI reader of the training pipeline (``None``: the kind's default), used strictly.
        modality: the intensity preprocessing: ``"CT"`` (``window``), ``"MR"``/``"MRI"`` (``percentiles``) or
            ``"other"`` (zero mean, unit variance).
        window: CT window (low, high) in HU, scaled to [0, 1] and clipped.
        percentiles: MR percentiles (low, high), scaled to [0, 1] and clipped.
        pixdim: resample to this voxel spacing before resizing, or ``None`` to keep the image grid.
        task: ``"classification"`` (``class_names`` are the classes; ``predictions.csv``) or ``"segmentation"``
            (``class_names`` are the label names, background first; the network's output channels; the inference
            segments whole images with a sliding window of ``spatial_shape`` and writes each label map as NIfTI in
            its input's space, see :func:`~monai_medmerge.bundle.inference.inference_config`).
        sw_batch_size, sw_overlap: the sliding window's windows per forward pass and overlap (segmentation).

    Returns:
        the bundle folder.

    Raises:
        ValueError: for class names that are missing, empty or repeated; when ``network_def`` is not a plain
            network config, does not match ``network``'s weights, the network does not run on an input of
            ``in_channels`` and ``spatial_size``, or the class count differs from ``len(class_names)``; for the
            preprocessing settings that :func:`~monai_medmerge.data.pipelines.preprocessing_config` refuses.
        FileExistsError: when ``out_dir`` exists and ``overwrite`` is False.
        NotADirectoryError: when ``out_dir`` is a file (it is left as it is) or a symbolic link.
        ValueError: when ``overwrite`` would replace a folder that holds the current folder.
        PermissionError: when the folder above ``out_dir`` cannot be written.
    """
    network_def = _plain_network_def(network_def)
    # built first: it checks the preprocessing settings before any network is run or file written
    segmentation = task == "segmentation"
    task_args = {"task": task} if segmentation else {}  # a classification record stays as it was
    if class_names is None:
        raise ValueError("class_names are needed: the names of the network's outputs, in order")
    class_names = check_class_names(class_names)  # repeated names would give the predictions table alike columns
    steps = preprocessing_config(
        kind, spatial_shape, train=False, reader=reader, modality=modality, window=window, percentiles=percentiles,
        pixdim=pixdim, label_key=None, channels=in_channels, **task_args,
    )  # fmt: skip
    reader = steps[0]["reader"]
    options = {"kind": kind, "reader": reader, "modality": modality, "window": window, "percentiles": percentiles}
    options = json.loads(json.dumps({**options, "pixdim": pixdim, **task_args}))  # plain lists for YAML
    config = inference_config(
        network_def, class_names, spatial_shape, steps, options, task=task, sw_batch_size=sw_batch_size,
        sw_overlap=sw_overlap,
    )  # fmt: skip
    modality = {"CT": "CT", "MR": "MR", "MRI": "MR"}.get(modality.upper(), "other")
    if value_range is None:
        value_range = (-4.0, 4.0) if modality == "other" else (0.0, 1.0)
    out = Path(out_dir)
    check_folder_target(out, overwrite, what="bundle folder")  # before any work: a refusal costs nothing
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    plain = _build(network_def)
    problems = state_dict_diff(plain, state, source="the network's weights")
    if problems:
        raise ValueError(
            f"network_def {network_def['_target_']} does not match the network's weights: {'; '.join(problems)}"
        )
    plain.load_state_dict(state, strict=True)
    plain.eval()
    was_training = network.training
    network.eval()
    x = torch.randn(2, in_channels, *spatial_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            ref = network.cpu()(x)
            got = plain(x)
    except RuntimeError as e:  # a shape the network cannot take: say which settings made it
        first = " ".join(str(e).split())[:300]
        raise ValueError(
            f"the network does not run on an input of shape {tuple(x.shape)} (batch, in_channels={in_channels}, "
            f"spatial_size={list(spatial_shape)}): check in_channels and spatial_size against the network; torch "
            f"said: {first}"
        ) from e
    finally:
        network.train(was_training)
    outputs = got.shape[1] if segmentation else got.shape[-1]
    if outputs != len(class_names):
        names = "label names" if segmentation else "class names"
        raise ValueError(f"the network has {outputs} outputs but {len(class_names)} {names} were given.")
    if not torch.allclose(ref, got, rtol=1e-4, atol=1e-5):
        raise ValueError("network_def rebuilt a network whose outputs differ from the given network's.")

    metadata = _metadata(name, version, description, class_names, spatial_shape, in_channels, value_range)
    metadata["required_packages_version"] = required_packages(reader, steps)
    metadata["data_type"] = {"png": "png/jpeg", "dicom_series": "dicom series"}.get(kind, kind)
    metadata["image_classes"] = input_description(steps)
    metadata["pred_classes"] = "softmax probabilities of: " + ", ".join(class_names)
    if segmentation:
        _segmentation_metadata(metadata, class_names)
    image = metadata["network_data_format"]["inputs"]["image"]
    image["modality"], image["format"] = MODALITY_METADATA[modality]
    if extra_metadata:
        metadata.update(extra_metadata)

    # replaces exactly ``out`` (never a sibling), with the permissions of a plain mkdir; see monai_medmerge.io
    with atomic_folder(out, overwrite, what="bundle folder") as tmp:
        (tmp / "configs").mkdir()
        (tmp / "models").mkdir()
        (tmp / "docs").mkdir()
        torch.save(state, tmp / "models" / "model.pt")
        scripted = False
        if torchscript:
            try:
                torch.jit.save(torch.jit.script(plain), str(tmp / "models" / "model.ts"))
                scripted = True
            except Exception as e:  # noqa: BLE001 - many architectures do not script; the state dict is enough
                print(f"[export] TorchScript skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        (tmp / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (tmp / "configs" / "inference.yaml").write_text(_yaml(config, metadata))
        (tmp / "configs" / "logging.conf").write_text(LOGGING_CONF)
        readme = _readme(metadata, reader, scripted)
        (tmp / "docs" / "README.md").write_text(_segmentation_readme(readme) if segmentation else readme)
        write_scripts(tmp)
    return out


def export_from_checkpoint(
    checkpoint: str | os.PathLike,
    network_def: Mapping[str, Any] | str | os.PathLike | functools.partial,
    out_dir: str | os.PathLike,
    class_names: Sequence[str],
    spatial_shape: Sequence[int],
    *,
    checkpoint_key: str | None = None,
    network_def_id: str = "network_def",
    **kwargs: Any,
) -> Path:
    """Export a saved network: build the plain network from ``network_def``, load ``checkpoint`` into it strictly,
    and write the bundle with :func:`export_bundle`.

    This is what ``medmerge export`` runs; a bundle can call it from its config, e.g. with the config file that
    defines ``network_def`` (so that references such as ``@num_classes`` resolve):

    .. code-block:: yaml

        export:
          _target_: monai_medmerge.bundle.export_from_checkpoint
          checkpoint: "$@bundle_root + '/models/model.pt'"
          network_def: "$@bundle_root + '/configs/train.yaml'"
          out_dir: "$@bundle_root + '/exported'"
          class_names: "@class_names"
          spatial_shape: "@spatial_size"

    Args:
        checkpoint: a ``.pt``/``.pth``/``.ckpt``/``.safetensors`` file, read without running pickled code
            (:func:`monai_medmerge.sources.load_checkpoint`).
        network_def: the architecture: a ``_target_`` mapping (already resolved), a bundle config mapping, a
            ``.json``/``.yaml`` file with either, or a ``functools.partial`` of the class (``_mode_: callable``);
            see :func:`monai_medmerge.bundle.network_def.resolve_network_def`.
        out_dir: the bundle folder to create.
        class_names: one name per output class, in output order.
        spatial_shape: the network's input spatial shape.
        checkpoint_key: the checkpoint entry that holds the state dict (``None``: found automatically).
        network_def_id: the id of the network in a whole bundle config.
        kwargs: more arguments of :func:`export_bundle` (``in_channels``, ``name``, ``modality``, ``reader``, ...).

    Returns:
        the bundle folder.

    Raises:
        FileNotFoundError: when the checkpoint or a network_def file does not exist.
        ValueError: when the checkpoint cannot be read or is refused, when ``network_def`` cannot be resolved or
            built, when the checkpoint's keys or shapes do not fit the network (the message names the file and the
            keys), and for the reasons of :func:`export_bundle`; when ``out_dir`` is or contains the checkpoint or
            the network_def file (nothing is written or removed).
    """
    from monai_medmerge.sources import load_checkpoint

    inputs = {"checkpoint": checkpoint}
    if isinstance(network_def, (str, os.PathLike)):
        inputs["network_def file"] = network_def
    check_folder_target(out_dir, kwargs.get("overwrite", False), inputs, what="bundle folder")
    state = load_checkpoint(checkpoint, key=checkpoint_key)
    plain_def = _plain_network_def(resolve_network_def(network_def, network_def_id))
    network = _build(plain_def)
    problems = state_dict_diff(network, state)
    if problems:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit network_def {plain_def['_target_']}: {'; '.join(problems)}"
        )
    network.load_state_dict(state, strict=True)
    return export_bundle(network, plain_def, out_dir, class_names, spatial_shape, **kwargs)


def _yaml(config: Mapping[str, Any], metadata: Mapping[str, Any]) -> str:
    packages = ", ".join(["torch", "monai", "numpy", *metadata["required_packages_version"]])
    header = (
        f"# {metadata['name']}: MONAI inference workflow; needs {packages} (not monai_medmerge): see docs/README.md.\n"
        "#   python -m monai.bundle run --config_file configs/inference.yaml --bundle_root . \\\n"
        "#       --dataset_dir /path/to/images --output_dir /path/to/predictions\n"
        "# writes <output_dir>/predictions.csv (default output_dir: <bundle_root>/eval): a header row (file, then the\n"
        "# class names), then per input its path and the class probabilities; --csv_format monai writes MONAI's\n"
        "# ClassificationSaver format instead (no header). Inputs that cannot be read are listed with the reason in\n"
        "# <output_dir>/unreadable.csv (the others are classified) and the run then exits with status 1.\n"
    )
    if metadata.get("task") == "segmentation":
        header = header.split("# writes ")[0] + (
            "# writes <output_dir>/<input name>_seg.nii.gz (default output_dir: <bundle_root>/eval): the label map of\n"
            "# each input in its own grid and affine (and <series folder>_seg.dcm, a DICOM SEG object, for a DICOM\n"
            "# series where highdicom is installed). Inputs that cannot be read are listed with the reason in\n"
            "# <output_dir>/unreadable.csv (the others are segmented) and the run then exits with status 1.\n"
        )
    return header + yaml.dump(dict(config), Dumper=_Dumper, sort_keys=False, width=120)


class _Dumper(yaml.SafeDumper):
    """YAML as people write bundle configs: short lists and mappings of scalars on one line, the rest in blocks."""


def _one_line(data: list | dict) -> bool:
    values = data.values() if isinstance(data, dict) else data
    return all(not isinstance(v, dict) for v in values) and len(json.dumps(data)) <= 100


_Dumper.add_representer(
    list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=_one_line(data))
)
_Dumper.add_representer(
    dict, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", data, flow_style=_one_line(data))
)


def _build(network_def: Mapping[str, Any]) -> nn.Module:
    try:
        network = ConfigParser({"network_def": dict(network_def)}).get_parsed_content("network_def")
    except Exception as e:
        cause = e.__cause__ or e  # MONAI wraps the constructor's error in "Failed to instantiate ..."
        raise ValueError(
            f"could not build network_def {network_def['_target_']}: {type(cause).__name__}: {cause}"
        ) from e
    if not isinstance(network, nn.Module):
        raise ValueError(f"network_def {network_def['_target_']} built a {type(network).__name__}, not a network")
    return network


def _metadata(name, version, description, class_names, spatial_shape, in_channels, value_range) -> dict:
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: "exported by monai_medmerge"},
        **runtime_versions(),
        "required_packages_version": {},
        "name": name,
        "task": "classification",
        "description": description or "Classification network merged from several pretrained sources (MedMerge).",
        "authors": "monai_medmerge users",
        "copyright": "Copyright (c) the authors of this bundle",
        "references": ["MedMerge: https://arxiv.org/abs/2403.11646"],
        "intended_use": "Research only; not for clinical decisions.",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "any",
                    "num_channels": in_channels,
                    "spatial_shape": [int(s) for s in spatial_shape],
                    "dtype": "float32",
                    "value_range": [float(v) for v in value_range],
                    "is_patch_data": False,
                    "channel_def": {str(i): f"channel {i}" for i in range(in_channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(class_names),
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {str(i): c for i, c in enumerate(class_names)},
                }
            },
        },
        "merged_by": f"monai_medmerge {monai_medmerge.__version__} (not needed to load this bundle)",
    }


def _segmentation_metadata(metadata: dict[str, Any], label_names: Sequence[str]) -> None:
    """Metadata of a segmentation bundle (in place): the task, the label map output, patch inputs."""
    metadata["task"] = "segmentation"
    if metadata["description"].startswith("Classification network merged"):
        metadata["description"] = "Segmentation network merged from several pretrained sources (MedMerge)."
    metadata["label_classes"] = "one integer label map per image: " + ", ".join(
        f"{i} {name}" for i, name in enumerate(label_names)
    )
    metadata["pred_classes"] = metadata["label_classes"]
    metadata["network_data_format"]["inputs"]["image"]["is_patch_data"] = True
    spatial = metadata["network_data_format"]["inputs"]["image"]["spatial_shape"]
    metadata["network_data_format"]["outputs"]["pred"] = {
        "type": "image",
        "format": "segmentation",
        "num_channels": len(label_names),
        "spatial_shape": list(spatial),
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": True,
        "channel_def": {str(i): name for i, name in enumerate(label_names)},
    }


def _segmentation_readme(readme: str) -> str:
    """The classification README with its output section for label maps."""
    start, end = readme.index("## Output"), readme.index("## Classes (output order)")
    output = """## Output

One label map per input that was read, `<input name>_seg.nii.gz` in `output_dir`: the argmax over the labels below,
in the input's own grid, orientation and affine (`uint8`). Each whole image is segmented with a sliding window of
the network's input shape (`inferer` in `configs/inference.yaml`: `sw_batch_size`, `overlap`). A DICOM series input
also gets `<series folder>_seg.dcm`, a DICOM Segmentation object (one segment per label, referencing the series'
instances), where `highdicom` is installed (`pip install highdicom`); without it only the NIfTI mask is written.

An input that cannot be read (not an image of this kind, truncated, a DICOM series with a slice missing, the wrong
number of channels) does not stop the run: every other input is segmented, and `unreadable.csv` in `output_dir`
lists each unreadable input with the reason (`file,reason`; only the header when all were read). The run then exits
with status 1 and a last line that names the first one.

"""
    readme = readme[:start] + output + readme[end:].replace("## Classes (output order)", "## Labels (output channels)")
    return readme.replace("the predictions table", "the label maps").replace("classified", "segmented")


def _readme(metadata: Mapping[str, Any], reader: str, scripted: bool) -> str:
    image = metadata["network_data_format"]["inputs"]["image"]
    classes = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    class_lines = "\n".join(f"{i}. {c}" for i, c in classes.items())
    header = ",".join(["file", *classes.values()])
    torch_spec, *others = pip_requirements(metadata)
    others = " ".join(f'"{spec}"' for spec in others)
    ts = "\n- `models/model.ts`: the same network as TorchScript." if scripted else ""
    return f"""# {metadata["name"]}

{metadata["description"]}

This bundle needs MONAI, PyTorch, numpy and the packages below, nothing else and not monai_medmerge: its `network_def`
is a plain network class; `scripts/medmerge_transforms.py` holds the transforms that load and check images exactly as
in training, `scripts/medmerge_inference.py` what writes the predictions table and the list of unreadable inputs.

- `configs/inference.yaml`: the inference workflow (MONAI `SupervisedEvaluator`).
- `configs/metadata.json`: input and output formats, class names, versions (`required_packages_version`).
- `models/model.pt`: the network's state dict (loaded with `torch.load(..., weights_only=True)`).{ts}

## Input

{metadata["image_classes"]} Network input: {image["num_channels"]} channel(s) of spatial shape
{image["spatial_shape"]}. Each input is a file or a DICOM series folder, read with MONAI's `{reader}` only: a file
it cannot read is never read by another reader.

## Run

```bash
pip install "{torch_spec}"    # first and alone: the build for your machine (CPU or CUDA: pytorch.org)
pip install "{torch_spec}" {others}
python -m monai.bundle run --config_file configs/inference.yaml --bundle_root . \\
    --dataset_dir /path/to/images --output_dir /path/to/predictions
```

Every file and folder in `dataset_dir` is an input (`--image_glob '*.nii.gz'` narrows that); or give a list:
`--datalist "[{{'image': '/data/a.nii.gz'}}, {{'image': '/data/series_1'}}]"`. Run it in the bundle folder, or
name the folder with `--bundle_root`. Without `--output_dir` the results go to `eval/` in the bundle folder.

## Output

`predictions.csv` in `output_dir`: a header row, then one row per input that was read, the softmax probabilities
in the class order below:

```
{header}
```

`--csv_format monai` writes MONAI's `ClassificationSaver` format instead, for tools that read it: no header, each
row the input's path and the probabilities.

An input that cannot be read (not an image of this kind, truncated, a DICOM series with a slice missing, the wrong
number of channels) does not stop the run: every other input is classified, and `unreadable.csv` in `output_dir`
lists each unreadable input with the reason (`file,reason`; only the header when all were read). The run then exits
with status 1 and a last line that names the first one.

## Classes (output order)

{class_lines}

## Check

```bash
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.yaml
```
"""
