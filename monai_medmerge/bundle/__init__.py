"""Export of merged networks as standard MONAI bundles."""

from __future__ import annotations

from monai_medmerge.bundle.export import SCHEMA_URL, export_bundle

__all__ = ["SCHEMA_URL", "export_bundle"]
