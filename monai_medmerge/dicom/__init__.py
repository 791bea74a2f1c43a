"""Clinical DICOM: datalists from DICOM folders and from DICOMweb servers, and inference over DICOMweb."""

from __future__ import annotations
