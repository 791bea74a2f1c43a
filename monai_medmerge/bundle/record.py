"""What a training run trained: the record beside its model that the bundle's inference and evaluation read.

The training bundle writes ``models/model_config.json`` when phase 2 starts: the network's class and arguments,
the class names, the input shape and channels, and the preprocessing options, all resolved to plain values (command
line overrides included). The bundle's ``inference.yaml`` builds its network and preprocessing from this record
alone, so it runs without ``train.yaml`` and always matches the run that made ``models/model.pt``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_medmerge.io import write_json

__all__ = ["MODEL_CONFIG_FIELDS", "read_model_config", "write_model_config"]

MODEL_CONFIG_FIELDS = (
    "network_target",
    "network_args",
    "class_names",
    "spatial_size",
    "in_channels",
    "preprocessing_options",
)


def write_model_config(
    path: str | os.PathLike,
    network_target: str,
    network_args: Mapping[str, Any],
    class_names: Sequence[str],
    spatial_size: Sequence[int],
    in_channels: int,
    preprocessing_options: Mapping[str, Any],
) -> Path:
    """Write the record of what a run trains, atomically, as JSON.

    Raises:
        ValueError: when a value is not plain data (JSON cannot hold it), naming the field.
    """
    record = {
        "network_target": str(network_target),
        "network_args": dict(network_args),
        "class_names": [str(c) for c in class_names],
        "spatial_size": [int(s) for s in spatial_size],
        "in_channels": int(in_channels),
        "preprocessing_options": dict(preprocessing_options),
    }
    for field, value in record.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model config field {field!r} is not plain data ({e}): {value!r}") from None
    return write_json(path, record)


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The record written by :func:`write_model_config`.

    Raises:
        FileNotFoundError: when ``path`` does not exist (the model has not been trained in this bundle).
        ValueError: when the file is not JSON or lacks a field, naming the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: it is written by training (phase 2 of configs/train.yaml) beside models/model.pt"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a model config (JSON): {e}") from None
    missing = [f for f in MODEL_CONFIG_FIELDS if not isinstance(record, dict) or f not in record]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {', '.join(missing)}")
    return record
