"""Retrieval throughput over DICOMweb: instances per second from a local Orthanc into the series cache.

A generated CT series of ``--slices`` slices (``--size`` x ``--size`` pixels, 16 bit) is uploaded to an Orthanc
started for the run (:class:`~medmerge_bench.orthanc.OrthancServer`, loopback, authentication on), then
retrieved with :class:`~monai_medmerge.dicom.web.DICOMwebSource` ``--repeats`` times from an empty cache (``cold``:
one streamed WADO-RS request for the series), and as many times as a resumed retrieval (``resume``: the first instance
is already cached, so each of the others is its own WADO-RS request). Reports the median instances per second of each,
with the machine, the versions (Orthanc's from ``GET /system``) and the seed.

Usage::

    python benchmarks/dicomweb_throughput.py            # writes benchmarks/results/dicomweb_throughput.json
    python benchmarks/dicomweb_throughput.py --quick --out /tmp/q.json

Needs Orthanc with its DICOMweb plugin and dicomweb-client (``bash .ci/orthanc``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medmerge_bench.comparison import machine_description
from medmerge_bench.orthanc import OrthancServer, OrthancUnavailable
from monai_medmerge.dicom.web import DICOMwebSource
from monai_medmerge.io import write_json

OUT = Path(__file__).resolve().parent / "results" / "dicomweb_throughput.json"
USER, PASSWORD = "bench", "bench-password"


def write_series(folder: Path, slices: int, size: int, seed: int) -> list[Path]:
    """A CT series from pydicom's ``CT_small.dcm`` with new UIDs and ``slices`` evenly spaced noisy slices."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(slices):
        sop = generate_uid()
        base.StudyInstanceUID, base.SeriesInstanceUID, base.SOPInstanceUID = study, series, sop
        base.file_meta.MediaStorageSOPInstanceUID = sop
        base.PatientID, base.PatientName = "BENCH", "Bench^Mark"
        base.InstanceNumber, base.ImagePositionPatient = i + 1, [0.0, 0.0, float(i)]
        base.ImageOrientationPatient, base.PixelSpacing, base.SliceThickness = [1, 0, 0, 0, 1, 0], [1.0, 1.0], 1.0
        base.Rows = base.Columns = size
        base.PixelData = (1024 + rng.normal(0, 100, (size, size))).astype(np.int16).tobytes()
        path = folder / f"{i:04d}.dcm"
        base.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(slices: int, size: int, repeats: int, seed: int) -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="dicomweb-bench-") as tmp:
        tmp = Path(tmp)
        files = write_series(tmp / "series", slices, size, seed)
        nbytes = sum(p.stat().st_size for p in files)
        with OrthancServer(tmp / "orthanc", USER, PASSWORD) as server:
            start = time.perf_counter()
            server.upload(files)
            upload_s = time.perf_counter() - start
            cache = tmp / "cache"
            source = DICOMwebSource(server.dicomweb_url, USER, PASSWORD, cache_dir=cache)
            (record,) = source.search_series(modality="CT")
            times: dict[str, list[float]] = {"cold": [], "resume": []}
            for _ in range(repeats):
                for mode in ("cold", "resume"):
                    shutil.rmtree(cache, ignore_errors=True)
                    fetched = slices
                    if mode == "resume":
                        # one instance already cached and no marker: every other instance is its own request
                        first = source.instance_uids(record["StudyInstanceUID"], record["SeriesInstanceUID"])[0]
                        folder = source.series_dir(record)
                        folder.mkdir(parents=True)
                        shutil.copy(next(p for p in files if _sop(p) == first), folder / f"{first}.dcm")
                        fetched = slices - 1
                    before = source.fetched_instances
                    start = time.perf_counter()
                    source.retrieve_series(dict(record))
                    elapsed = time.perf_counter() - start
                    assert source.fetched_instances - before == fetched
                    times[mode].append(fetched / elapsed)
            start = time.perf_counter()
            source.retrieve_series(dict(record))
            cached_s = time.perf_counter() - start
            versions = {
                "orthanc": server.version,
                "orthanc_dicomweb_plugin": server.dicomweb_version(),
                "dicomweb-client": _version("dicomweb-client"),
                "pydicom": _version("pydicom"),
                "requests": _version("requests"),
            }
    result = {
        "benchmark": "dicomweb_throughput",
        "what": (
            "instances per second retrieved from a local Orthanc (loopback HTTP, basic auth) into the series cache: "
            "'cold' = empty cache, one streamed WADO-RS series request; 'resume' = first instance cached, one "
            "WADO-RS request per instance; each file written to a temporary name and renamed"
        ),
        "seed": seed,
        "series": {
            "instances": slices,
            "rows_columns": size,
            "bits": 16,
            "mean_instance_bytes": round(nbytes / slices),
        },
        "repeats": repeats,
        "results": {
            mode: {
                "instances_per_s_median": round(statistics.median(values), 1),
                "instances_per_s": [round(v, 1) for v in values],
                "MB_per_s_median": round(statistics.median(values) * nbytes / slices / 1e6, 2),
            }
            for mode, values in times.items()
        },
        "upload_instances_per_s": round(slices / upload_s, 1),
        "cached_rerun_s": round(cached_s, 4),
        "versions": versions,
        "machine": machine_description(),
        # other work on the machine slows Orthanc and the client alike: the 1-minute load average when the run began
        "load_average_at_start": None if load is None else round(load, 2),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    return result


def _sop(path: Path) -> str:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="30 slices, one repeat (checks that it runs)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.slices, args.repeats = 30, 1
    try:
        result = run(args.slices, args.size, args.repeats, args.seed)
    except OrthancUnavailable as e:
        print(f"[dicomweb_throughput] {e}", file=sys.stderr)
        return 2
    write_json(args.out, result)
    for mode, r in result["results"].items():
        rate, mbps = r["instances_per_s_median"], r["MB_per_s_median"]
        print(f"{mode}: {rate} instances/s (median of {args.repeats}), {mbps} MB/s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
