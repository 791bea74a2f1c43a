"""Export of merged networks as standard MONAI bundles, and the record a training run keeps beside its model."""

from __future__ import annotations

from monai_medmerge.bundle.export import SCHEMA_URL, export_bundle, export_from_checkpoint
from monai_medmerge.bundle.inference import inference_config
from monai_medmerge.bundle.network_def import resolve_network_def
from monai_medmerge.bundle.record import read_model_config, write_model_config

__all__ = [
    "SCHEMA_URL",
    "export_bundle",
    "export_from_checkpoint",
    "inference_config",
    "read_model_config",
    "resolve_network_def",
    "write_model_config",
]
