"""bundles/medmerge_segmentation end to end: merge two UNets trained on other structures into one for new ones, with
`python -m monai.bundle run`; evaluate by Dice; export a bundle without the plugin whose inference writes masks in
each input's space (run in the plain environment where monai_medmerge is not installed)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.bundle.bundle_utils import run_bundle

nib = pytest.importorskip("nibabel")

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "medmerge_segmentation"
WIDTHS = [8, 16, 32]
PATCH = [48, 48]
PLAIN_ENV = Path(os.environ.get("MEDMERGE_PLAIN_ENV", "/tmp/medmerge_plain_env"))
PLAIN_PY = PLAIN_ENV / "bin" / "python"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    from monai_medmerge.bundle.example import make_segmentation_example

    root = tmp_path_factory.mktemp("seg") / "workspace"
    return make_segmentation_example(root, n_train=8, n_test=4, widths=WIDTHS, source_epochs=2, progress=False)


def _overrides(example: dict, root: Path, **more) -> list[str]:
    values = {
        "bundle_root": str(root),
        "dataset_dir": str(Path(example["datalist"]).parent),
        "sources": repr(example["sources"]),
        "label_names": repr(example["label_names"]),
        "network_args#channels": repr(WIDTHS),
        "network_args#strides": repr([2] * (len(WIDTHS) - 1)),
        "spatial_size": repr(PATCH),
        "phase1_epochs": "2",
        "phase2_epochs": "2",
        "batch_size": "4",
        "progress": "False",
        **{k: str(v) for k, v in more.items()},
    }
    return [a for k, v in values.items() for a in (f"--{k}", v)]


def _bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE, root)
    return root


def _items(example: dict, section: str) -> list[dict]:
    data = Path(example["datalist"]).parent
    items = json.loads(Path(example["datalist"]).read_text())[section]
    return [{k: str(data / v) for k, v in item.items()} for item in items]


def _reference_masks(example: dict, model_file: Path, items: list[dict]) -> list[np.ndarray]:
    """Masks of the trained network computed here, through the training side's own evaluation preprocessing and a
    sliding window of the patch size (the example's images are already in RAS on their grid, so no inversion)."""
    from monai.bundle import ConfigParser
    from monai.inferers import SlidingWindowInferer

    from monai_medmerge.data.pipelines import segmentation_transforms

    net_def = {**example["network_def"], "channels": WIDTHS, "strides": [2] * (len(WIDTHS) - 1)}
    net = ConfigParser({"n": net_def}).get_parsed_content("n")
    net.load_state_dict(torch.load(model_file, weights_only=True))
    net.eval()
    pre = segmentation_transforms(
        kind="nifti", spatial_size=PATCH, train=False, modality="MR", label_key=None, num_classes=3
    )
    inferer = SlidingWindowInferer(roi_size=PATCH, sw_batch_size=4, overlap=0.25, mode="gaussian")
    masks = []
    with torch.no_grad():
        for item in items:
            x = pre({"image": item["image"]})["image"][None]
            masks.append(inferer(x, net).argmax(1)[0].numpy())
    return masks


def test_train_evaluate_export_and_plain_inference(example, tmp_path):
    root = _bundle(tmp_path)
    run = run_bundle(root, ["train.yaml"], _overrides(example, root))
    assert run.returncode == 0, run.stdout[-4000:]
    model = root / "models" / "model.pt"
    assert model.is_file() and (root / "models" / "phase2.done").is_file()
    # the kept state is the best validation mean Dice, a score in (0, 1]
    best = json.loads((root / "models" / "model.pt.best.json").read_text())
    assert 0.0 < best["best_metric"] <= 1.0

    # evaluation: MONAI's mean Dice over the foreground labels of the test images, and the per-image details
    ev = run_bundle(root, ["train.yaml", "evaluate.yaml"], _overrides(example, root))
    assert ev.returncode == 0, ev.stdout[-4000:]
    metrics = dict(csv.reader((root / "eval" / "metrics.csv").open()))
    dice = float(metrics["test_mean_dice"])
    assert 0.0 < dice <= 1.0
    header, *rows = list(csv.reader((root / "eval" / "test_mean_dice_raw.csv").open()))
    # one row per test image, one column per foreground label (class0 is label 1), then their mean
    assert header == ["filename", "class0", "class1", "mean"] and len(rows) == 4
    assert np.mean([float(r[-1]) for r in rows]) == pytest.approx(dice, abs=1e-4)
    assert sorted(p.name for p in (root / "eval" / "masks").iterdir()) == sorted(
        Path(i["image"]).name.replace(".nii.gz", "_seg.nii.gz") for i in _items(example, "test")
    )

    # export: a bundle without the plugin; its inference writes one mask per input, in the input's own space
    ex = run_bundle(root, ["train.yaml"], _overrides(example, root), run_id="export")
    assert ex.returncode == 0, ex.stdout[-4000:]
    exported = root / "exported"
    meta = json.loads((exported / "configs" / "metadata.json").read_text())
    assert meta["task"] == "segmentation"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        str(i): n for i, n in enumerate(example["label_names"])
    }
    if not PLAIN_PY.exists():
        pytest.skip(f"no plain MONAI environment at {PLAIN_ENV}: run `bash .ci/plain_env`")
    items = _items(example, "test")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for item in items:
        shutil.copy(item["image"], inputs / Path(item["image"]).name)
    out = tmp_path / "masks"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [str(PLAIN_PY), "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
    cmd += ["--bundle_root", str(exported), "--dataset_dir", str(inputs), "--output_dir", str(out)]
    plain = subprocess.run(cmd, cwd=exported, env=env, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, (plain.stdout + plain.stderr)[-4000:]
    reference = _reference_masks(example, model, items)
    # the training bundle's own inference.yaml (with the plugin) writes the same masks
    own = run_bundle(root, ["inference.yaml"], ["--input_dir", str(inputs), "--output_dir", str(tmp_path / "own")])
    assert own.returncode == 0, own.stdout[-4000:]
    for item, ref in zip(items, reference, strict=True):
        name = Path(item["image"]).name.removesuffix(".nii.gz")
        written = nib.load(str(out / f"{name}_seg.nii.gz"))
        source = nib.load(item["image"])
        assert written.shape[:2] == source.shape[:2]
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
        mask = np.asarray(written.dataobj).reshape(source.shape[:2])
        assert set(np.unique(mask)) <= {0, 1, 2}
        np.testing.assert_array_equal(mask, ref)
        ours = nib.load(str(tmp_path / "own" / f"{name}_seg.nii.gz"))
        np.testing.assert_allclose(ours.affine, source.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(ours.dataobj).reshape(source.shape[:2]), ref)


def test_paper_recipe_fine_tunes_the_sources_first(example, tmp_path):
    root = _bundle(tmp_path)
    run = run_bundle(
        root,
        ["train.yaml"],
        _overrides(example, root, recipe="paper", phase0_epochs=1, phase0_head_epochs=1),
        run_id="paper",
    )
    assert run.returncode == 0, run.stdout[-4000:]
    for i in range(2):
        assert (root / "models" / f"phase0_source{i}.done").is_file()
        state = torch.load(root / "models" / f"phase0_source{i}.pt", weights_only=True)
        # each fine-tuned source has the target's three label channels in its new head
        assert any(v.ndim >= 1 and v.shape[0] == 3 for k, v in state.items() if k.endswith("bias"))
    assert (root / "models" / "model.pt").is_file()


def test_distilled_phase2_and_the_room_of_phase_0(example, tmp_path):
    """The paper recipe writes the room after phase 0 in mean Dice (each network's value is the best validation mean
    Dice its phase-0 fine-tuning kept: the same metric on the same images); ``distill_weight`` > 0 distils the
    phase-0 ensemble into phase 2 on mixup blends or on random patches of an unlabelled section, and checkpoints its
    draws; ``phase2_start: anchor`` fine-tunes the anchor's phase-0 network with no merge."""
    from monai_medmerge.workflows.engines import latest_checkpoint

    root = _bundle(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(Path(example["datalist"]).parent, data)
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["unlabeled"] = []
    for i, item in enumerate(datalist["test"]):  # copies of the test images under new names, without label maps
        shutil.copy(data / item["image"], data / f"unlabelled_{i}.nii.gz")
        datalist["unlabeled"].append({"image": f"unlabelled_{i}.nii.gz"})
    (data / "datalist.json").write_text(json.dumps(datalist))
    base = dict(recipe="paper", phase0_epochs=2, dataset_dir=data)
    models = root / "models"
    run = run_bundle(root, ["train.yaml"], _overrides(example, root, **base), run_id="phase0")
    assert run.returncode == 0, run.stdout[-4000:]
    room = json.loads((models / "phase0_room.json").read_text())
    assert room["metric"] == "mean_dice" and room["images"] == len(datalist["validation"])
    kept = [json.loads((models / f"phase0_source{i}.pt.best.json").read_text())["best_metric"] for i in range(2)]
    assert room["networks"] == pytest.approx(kept, abs=1e-6)
    assert room["room"] == pytest.approx(room["ensemble"] - max(room["networks"]))
    assert "phase 0, validation mean Dice: networks" in run.stdout
    results = {}
    for name, more in (
        ("plain", {}),
        ("mixup", {"distill_weight": 1.0, "phase2_steps_per_epoch": 3}),
        ("patches", {"distill_weight": 1.0, "phase2_steps_per_epoch": 3, "unlabeled_section": "unlabeled"}),
        ("anchor", {"distill_weight": 1.0, "phase2_start": "anchor", "finetune_lr": 0.0, "phase2_epochs": 1}),
    ):
        (models / "phase1_best.pt").unlink(missing_ok=True)
        run = run_bundle(root, ["train.yaml"], _overrides(example, root, **base, **more))  # phases 1 and 2
        assert run.returncode == 0, (name, run.stdout[-4000:])
        results[name] = torch.load(models / "model.pt", weights_only=True)
        saved = torch.load(latest_checkpoint(models, "phase2"), weights_only=True)
        assert ("distillation" in saved) == (name != "plain"), (name, list(saved))
        assert (models / "phase1_best.pt").exists() == (name != "anchor")  # the anchor start skips phase 1
        if name == "patches":  # 3 steps an epoch of 4 labelled patches: 12 unlabelled patches from 4 images
            assert saved["distillation"]["passes"] >= 3, saved["distillation"]
    assert results["anchor"].keys() == results["plain"].keys()
    # at a learning rate of 0 the anchor start keeps the anchor's phase-0 weights (norm statistics still move)
    phase0 = torch.load(models / "phase0_source0.pt", weights_only=True)
    weights = [k for k in phase0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(results["anchor"][k], phase0[k]) for k in weights)
    names = ["plain", "mixup", "patches"]
    for i, a in enumerate(names):  # each setting trains another network at the same seed
        for b in names[i + 1 :]:
            assert any(not torch.equal(results[a][k], results[b][k]) for k in results[a]), (a, b)
    # bad settings are refused when the run starts
    run = run_bundle(root, ["train.yaml"], _overrides(example, root, dataset_dir=data, distill_weight=1.0))
    assert run.returncode != 0 and "distill_weight=1.0 needs recipe: paper" in run.stdout


def test_a_label_map_that_does_not_fit_its_image_names_both_files(example, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(example["datalist"]).parent, data)
    datalist = json.loads((data / "datalist.json").read_text())
    item = datalist["training"][2]
    label = nib.load(str(data / item["label"]))
    cut = np.asarray(label.dataobj)[:-3]
    nib.save(nib.Nifti1Image(cut, label.affine), str(data / item["label"]))
    root = _bundle(tmp_path)
    run = run_bundle(root, ["train.yaml"], _overrides(example, root, dataset_dir=data))
    assert run.returncode != 0
    assert Path(item["label"]).name in run.stdout and Path(item["image"]).name in run.stdout, run.stdout[-3000:]
    assert not (root / "models" / "model.pt").exists()


def test_properties_metadata_and_the_shared_overlay(example, tmp_path):
    from monai.bundle import ConfigWorkflow

    from tests.bundle.bundle_utils import BUNDLE as CLASSIFICATION
    from tests.bundle.bundle_utils import metadata_schema

    root = _bundle(tmp_path)
    args = {
        "bundle_root": str(root),
        "dataset_dir": str(Path(example["datalist"]).parent),
        "sources": example["sources"],
        "label_names": example["label_names"],
        "network_args#channels": WIDTHS,
        "network_args#strides": [2] * (len(WIDTHS) - 1),
        "spatial_size": PATCH,
        "progress": False,
    }
    train = ConfigWorkflow(
        config_file=str(root / "configs" / "train.yaml"),
        meta_file=str(root / "configs" / "metadata.json"),
        workflow_type="train",
        **args,
    )
    train.initialize()
    assert train.check_properties() == []
    # the merge collapses to the plain network_def, whose output has one channel per label
    net = train.parser.get_parsed_content("network_def")
    merge = train.parser.get_parsed_content("merge_network")
    assert type(net) is type(merge.collapse())
    net.load_state_dict(merge.collapse().state_dict(), strict=True)
    assert net(torch.zeros(1, 1, *PATCH)).shape == (1, 3, *PATCH)
    # the multi-GPU overlay is the classification bundle's, byte for byte (the same ids in both train.yaml)
    overlay = "configs/multi_gpu_train.yaml"
    assert (BUNDLE / overlay).read_bytes() == (CLASSIFICATION / overlay).read_bytes()
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    schema = metadata_schema()  # skips, saying where to get it, when absent
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(meta, schema)


def test_torchrun_two_processes_agree(example, tmp_path):
    """The classification bundle's multi-GPU overlay runs the segmentation bundle under torchrun (gloo on CPU): the
    mean Dice of validation is gathered from both processes, so both keep the same states."""

    import yaml

    from tests.bundle.bundle_utils import RANKS_OVERLAY, TORCHRUN

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    root = _bundle(tmp_path)
    (root / "configs" / "ranks.yaml").write_text(yaml.safe_dump(RANKS_OVERLAY, width=1000))
    files = [str(root / "configs" / f) for f in ("train.yaml", "multi_gpu_train.yaml", "ranks.yaml")]
    cmd = [*TORCHRUN, "--nproc_per_node=2", "--standalone", "-m", "monai.bundle", "run", "--config_file", repr(files)]
    cmd += ["--logging_file", str(root / "configs" / "logging.conf"), *_overrides(example, root)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    models = root / "models"
    c0 = torch.load(models / "coefficients_rank0.pt", weights_only=True)
    assert torch.equal(c0, torch.load(models / "coefficients_rank1.pt", weights_only=True))
    start = torch.tensor([0.9, 0.1]).log()  # the anchored start: the coefficients were trained away from it
    assert not torch.allclose(c0 - c0.logsumexp(0, keepdim=True), start[:, None].expand_as(c0), atol=1e-4)
    p0 = torch.load(models / "phase2_rank0.pt", weights_only=True)
    p1 = torch.load(models / "phase2_rank1.pt", weights_only=True)
    for k in p0:
        torch.testing.assert_close(p0[k], p1[k], msg=f"phase-2 tensor {k} differs between the two processes")
    assert torch.load(models / "model.pt", weights_only=True).keys() == p0.keys()


def test_a_dicom_series_gets_its_mask_as_nifti_and_as_dicom_seg(tmp_path):
    """A network that labels CT voxels above 0 HU as label 1: the DICOM SEG frames of each source instance must equal
    that threshold of the instance's own pixels, read with pydicom (independently of the bundle's reader and of how it
    stacked the slices)."""
    pydicom = pytest.importorskip("pydicom")
    hd = pytest.importorskip("highdicom")
    pytest.importorskip("itk")
    from monai_medmerge.bundle import export_bundle

    series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    if not series.is_dir():
        pytest.skip(f"pydicom's test series not found at {series}")
    net = torch.nn.Conv3d(1, 3, 1)
    with torch.no_grad():  # logits: label 1 where the windowed intensity (HU + 1000) / 2000 is above 0.5
        net.weight.zero_()
        net.bias.copy_(torch.tensor([0.0, -50.0, -100.0]))
        net.weight[1, 0] = 100.0
    net_def = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 3, "kernel_size": 1}
    bundle = export_bundle(
        net, net_def, tmp_path / "bundle", ["background", "above 0 HU", "never"], [32, 32, 4],
        kind="dicom_series", modality="CT", task="segmentation",
    )  # fmt: skip
    inputs = tmp_path / "inputs"
    shutil.copytree(series, inputs / "CT5N")
    cmd = [os.sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
    cmd += ["--bundle_root", str(bundle), "--dataset_dir", str(inputs), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (tmp_path / "out" / "CT5N_seg.nii.gz").is_file()
    seg = hd.seg.segread(str(tmp_path / "out" / "CT5N_seg.dcm"))
    sources = [pydicom.dcmread(f) for f in sorted((inputs / "CT5N").iterdir())]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["above 0 HU", "never"]
    checked = 0
    for ds in sources:
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[ds.SOPInstanceUID], combine_segments=True)[
            0
        ]
        np.testing.assert_array_equal(labels, (hu > 0).astype(labels.dtype))
        checked += int((hu > 0).sum() > 0)
    assert checked >= 3  # the threshold labels something on most slices
