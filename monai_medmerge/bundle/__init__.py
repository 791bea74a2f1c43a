"""Export of merged networks as standard MONAI bundles."""

from __future__ import annotations

from monai_medmerge.bundle.export import SCHEMA_URL, export_bundle, export_from_checkpoint
from monai_medmerge.bundle.inference import inference_config
from monai_medmerge.bundle.network_def import resolve_network_def

__all__ = ["SCHEMA_URL", "export_bundle", "export_from_checkpoint", "inference_config", "resolve_network_def"]
