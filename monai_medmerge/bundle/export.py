"""Export a collapsed network as a standard MONAI bundle that loads without this package."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.bundle import ConfigParser
from torch import nn

import monai_medmerge

__all__ = ["export_bundle", "SCHEMA_URL"]

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


def _check_network_def(network_def: Mapping[str, Any]) -> None:
    target = network_def.get("_target_") if isinstance(network_def, Mapping) else None
    if not isinstance(target, str) or "." not in target:
        raise ValueError(
            f"network_def needs a full dotted '_target_' (e.g. 'monai.networks.nets.ResNet'), got {network_def!r}."
        )
    if target.split(".")[0] == "monai_medmerge":
        raise ValueError(
            f"network_def '_target_' is {target!r}: an exported bundle must build a plain MONAI or torch network, "
            "so that it loads where monai_medmerge is not installed. Export the collapsed network."
        )


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
    value_range: Sequence[float] = (-4.0, 4.0),
    extra_metadata: Mapping[str, Any] | None = None,
    torchscript: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``network`` as a MONAI bundle folder: ``configs/metadata.json``, ``configs/inference.json``,
    ``models/model.pt`` (a state dict), ``models/model.ts`` (TorchScript, when the network scripts) and
    ``docs/README.md``.

    The folder is assembled under a temporary name beside ``out_dir`` and renamed into place, so an interrupted
    export never leaves a half-written bundle. Before anything is written, ``network_def`` is instantiated and the
    weights are loaded into it strictly, and its outputs are compared with ``network``'s.

    Args:
        network: the plain network (e.g. ``KernelMerge.collapse()``), in any mode.
        network_def: MONAI config of the network's class, e.g. ``{"_target_": "monai.networks.nets.ResNet", ...}``.
        out_dir: the bundle folder to create.
        class_names: one name per output class, in output order.
        spatial_shape: input spatial shape (e.g. ``[32, 32]``).
        in_channels: input channels.
        name: bundle name (metadata ``name``).
        description: one paragraph for the metadata and README.
        version: bundle version.
        value_range: expected input intensity range, for the metadata.
        extra_metadata: more metadata fields (e.g. how the merge was made), merged at the top level.
        torchscript: also write ``models/model.ts`` when ``torch.jit.script`` succeeds.
        overwrite: replace an existing ``out_dir``.

    Returns:
        the bundle folder.

    Raises:
        ValueError: when ``network_def`` is not a plain network config, does not match ``network``'s weights, or
            the class count differs from ``len(class_names)``.
        FileExistsError: when ``out_dir`` exists and ``overwrite`` is False.
    """
    _check_network_def(network_def)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"bundle folder {out} exists; pass overwrite=True to replace it.")
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    plain = ConfigParser({"network_def": dict(network_def)}).get_parsed_content("network_def")
    try:
        plain.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"network_def {network_def['_target_']} does not match the network's weights: {e}") from e
    plain.eval()
    was_training = network.training
    network.eval()
    x = torch.randn(2, in_channels, *spatial_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = network.cpu()(x)
        got = plain(x)
    network.train(was_training)
    if got.shape[-1] != len(class_names):
        raise ValueError(f"the network has {got.shape[-1]} outputs but {len(class_names)} class names were given.")
    if not torch.allclose(ref, got, rtol=1e-4, atol=1e-5):
        raise ValueError("network_def rebuilt a network whose outputs differ from the given network's.")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
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
        metadata = _metadata(name, version, description, class_names, spatial_shape, in_channels, value_range)
        if extra_metadata:
            metadata.update(extra_metadata)
        (tmp / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (tmp / "configs" / "inference.json").write_text(json.dumps(_inference_config(network_def), indent=2) + "\n")
        (tmp / "docs" / "README.md").write_text(_readme(name, description, class_names, spatial_shape, scripted))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _metadata(name, version, description, class_names, spatial_shape, in_channels, value_range) -> dict:
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: "exported by monai_medmerge"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
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
                    "spatial_shape": list(spatial_shape),
                    "dtype": "float32",
                    "value_range": list(value_range),
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


def _inference_config(network_def: Mapping[str, Any]) -> dict:
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": dict(network_def),
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "load_weights": "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activations", "softmax": True}],
        },
        "initialize": ["$@load_weights", "$@network.eval()"],
        "run": [],
    }


def _readme(name, description, class_names, spatial_shape, scripted) -> str:
    classes = "\n".join(f"{i}. {c}" for i, c in enumerate(class_names))
    ts = "\n- `models/model.ts`: the same network as TorchScript." if scripted else ""
    return f"""# {name}

{description or "A classification network merged from several pretrained sources with MedMerge."}

This bundle needs MONAI and PyTorch only: its `network_def` is a plain network class.

- `models/model.pt`: the network's state dict (load with `torch.load(..., weights_only=True)`).{ts}
- Input: {len(spatial_shape)}-D images of spatial shape {list(spatial_shape)}.

Classes (output order):

{classes}

```python
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config("configs/inference.json")
parser["bundle_root"] = "."
net = parser.get_parsed_content("network")
parser.get_parsed_content("load_weights")
```
"""
