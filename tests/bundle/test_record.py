"""The record a training run keeps beside its model (models/model_config.json)."""

from __future__ import annotations

import json

import pytest

from monai_medmerge.bundle import read_model_config, write_model_config

FIELDS = {
    "network_target": "monai.networks.nets.ResNet",
    "network_args": {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 16, 32]},
    "class_names": ["a", "b"],
    "spatial_size": (32, 32),
    "in_channels": 1,
    "preprocessing_options": {"kind": "nifti", "reader": "NibabelReader", "modality": "MR", "pixdim": None},
}


def test_round_trip_as_plain_json(tmp_path):
    path = write_model_config(tmp_path / "models" / "model_config.json", **FIELDS)
    record = read_model_config(path)
    assert record == {**FIELDS, "spatial_size": [32, 32]}
    assert json.loads(path.read_text()) == record
    assert [p.name for p in path.parent.iterdir()] == ["model_config.json"]  # no temporary left


def test_errors_name_the_file_and_field(tmp_path):
    missing = tmp_path / "models" / "model_config.json"
    with pytest.raises(FileNotFoundError, match="model_config.json not found: it is written by training"):
        read_model_config(missing)
    missing.parent.mkdir()
    missing.write_text("{not json")
    with pytest.raises(ValueError, match="model_config.json is not a model config"):
        read_model_config(missing)
    missing.write_text(json.dumps({k: v for k, v in FIELDS.items() if k != "class_names"}))
    with pytest.raises(ValueError, match="lacks the field.s. class_names"):
        read_model_config(missing)
    with pytest.raises(ValueError, match="'network_args' is not plain data"):
        write_model_config(tmp_path / "x.json", **{**FIELDS, "network_args": {"act": object()}})
    assert not (tmp_path / "x.json").exists()
