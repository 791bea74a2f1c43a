from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "medmerge_classification"
WIDTHS = [8, 16, 16, 32]

# written by every process at the end, so the test can compare what each one holds
# torchrun through the interpreter under test (what the `torchrun` script runs), never whichever torchrun comes
# first on PATH: that may belong to another Python, without this package
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
RANKS_OVERLAY = {
    "finalize": [
        "$torch.save(@merge_network.merge_logits.detach().cpu(),"
        " os.path.join(@ckpt_dir, f'coefficients_rank{dist.get_rank()}.pt'))",
        "$torch.save({k: v.detach().cpu() for k, v in @finetune#network.module.state_dict().items()},"
        " os.path.join(@ckpt_dir, f'phase2_rank{dist.get_rank()}.pt'))",
        # the unlabelled images this process reads in a distilled phase 2 (its share, by the overlay's sampler)
        "$torch.save(torch.tensor(list(@unlabeled#sampler)),"
        " os.path.join(@ckpt_dir, f'unlabeled_rank{dist.get_rank()}.pt'))",
        "$dist.is_initialized() and dist.destroy_process_group()",
    ]
}


def bundle_copy(dst: Path) -> Path:
    """A copy of bundles/medmerge_classification to train in (so the repository's folder stays clean)."""
    shutil.copytree(BUNDLE, dst)
    return dst


def overrides(example: dict, bundle_root: Path, **more) -> list[str]:
    """Command-line overrides that point the bundle at the example workspace, with small networks and epochs."""
    values = {
        "bundle_root": str(bundle_root),
        "dataset_dir": str(Path(example["datalist"]).parent),
        "sources": repr(example["sources"]),
        "class_names": repr(example["class_names"]),
        "network_args#block_inplanes": repr(WIDTHS),
        "phase1_epochs": "2",
        "phase2_epochs": "2",
        "batch_size": "8",
        "progress": "False",
        **{k: str(v) for k, v in more.items()},
    }
    out = []
    for k, v in values.items():
        out += [f"--{k}", v]
    return out


def run_bundle(bundle_root: Path, configs: list[str], args: list[str], run_id: str | None = None, timeout=600):
    """``python -m monai.bundle run`` in ``bundle_root``; returns the completed process (stdout+stderr in .stdout)."""
    files = [str(bundle_root / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run"]
    if run_id:
        cmd.append(run_id)
    cmd += ["--config_file", repr(files), "--logging_file", str(bundle_root / "configs" / "logging.conf"), *args]
    proc = subprocess.run(cmd, cwd=bundle_root, capture_output=True, text=True, timeout=timeout)
    proc.stdout = proc.stdout + proc.stderr
    return proc


META_SCHEMA_NAME = "meta_schema_20240725.json"
META_SCHEMA = Path(__file__).resolve().parents[3] / "shared" / "monai" / META_SCHEMA_NAME


def metadata_schema() -> dict:
    """MONAI's bundle metadata schema, to validate metadata offline: the file ``$MEDMERGE_META_SCHEMA``, else
    ``../shared/monai/meta_schema_20240725.json`` beside the checkout. Skips the calling test, saying where the schema
    comes from, when neither exists (no pip package ships it; the project does not keep a copy)."""
    import json
    import os

    import pytest

    from monai_medmerge.bundle.export import SCHEMA_URL

    path = Path(os.environ.get("MEDMERGE_META_SCHEMA") or META_SCHEMA)
    if not path.is_file():
        pytest.skip(
            f"MONAI's metadata schema is not at {path}: it is the `schema` URL of every bundle's metadata, "
            f"{SCHEMA_URL} (MONAI-extra-test-data, Apache-2.0). Download it once (`curl -fLo {META_SCHEMA_NAME} "
            f"{SCHEMA_URL}`) and set MEDMERGE_META_SCHEMA to the file, or put it at {META_SCHEMA}."
        )
    return json.loads(path.read_text())


def datalist_with_unlabeled(example: dict, folder: Path, extra: dict | None = None) -> Path:
    """The example's datalist with an ``unlabeled`` section: copies of its test images under new names."""
    content = json.loads(Path(example["datalist"]).read_text())
    base = Path(example["datalist"]).parent
    folder.mkdir(parents=True)
    for section in ("training", "validation", "test"):
        for item in content[section]:
            item["image"] = str((base / item["image"]).resolve())
    pool = []
    for i, item in enumerate(content["test"]):
        copy = folder / f"unlabelled_{i}{''.join(Path(item['image']).suffixes)}"
        shutil.copy(item["image"], copy)
        pool.append({"image": str(copy)})
    content["unlabeled"] = pool
    content.update(extra or {})
    path = folder / "datalist.json"
    path.write_text(json.dumps(content))
    return path
