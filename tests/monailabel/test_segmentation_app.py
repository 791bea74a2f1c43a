"""The MONAI Label app (apps/monailabel) with a merged SEGMENTATION bundle, through a real ``monailabel start_server``
on a studies folder: ``/info/`` lists a segmentation model with its foreground labels, ``/infer`` answers with a
label map of the study (its shape and affine, label values only) computed by the served weights, the label maps the
datastore holds as final labels drive a ``/train`` request (merge training with bundles/medmerge_segmentation), and
the next ``/infer`` answers with the new weights.

The workspace is the product's segmentation example (``make_segmentation_example``: 2-D NIfTI discs, two source UNets
pretrained on other structures) at a tiny width; the first served bundle is one short run of the training bundle,
exported, in the main environment. The server runs in the separate environment made by ``.ci/monailabel_env``; where
it is absent the server tests skip and say so.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from monailabel_server import MonaiLabelServer, app_module, require_env, train_and_export_segmentation

nib = pytest.importorskip("nibabel")
pytest.importorskip("requests")

MODEL = "discs"
WIDTHS = (8, 16, 32)
PATCH = [48, 48]
# the app's train settings (--conf): small, and not the segmentation task's own defaults (5 and 10 epochs)
APP_SETTINGS = {"max_epochs": "1", "phase2_epochs": "2", "batch_size": "4", "val_split": "0.25"}
FLIPPED_FROM, FLIPPED = "test_0000_image", "flipped_test_0000_image"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_id(path: str | Path) -> str:
    return Path(path).name.removesuffix(".nii.gz")


# --- the label-map datalist and its split (plain Python: no server needed) ----------------------------------------
class _Datastore:
    """The part of a MONAI Label datastore that the segmentation datalist reads: its final image/label pairs."""

    def __init__(self, pairs: list[dict]) -> None:
        self.pairs = pairs

    def datalist(self) -> list[dict]:
        return self.pairs


def test_segmentation_datalist_and_random_split(tmp_path):
    labels = app_module("labels")
    pairs = []
    for i in (3, 1, 2, 0, 4):
        (tmp_path / f"l{i}.nii.gz").write_bytes(b"")
        pairs.append({"image": str(tmp_path / f"i{i}.nii.gz"), "label": str(tmp_path / f"l{i}.nii.gz")})
    items = labels.segmentation_datalist(_Datastore([*pairs, {}]))
    assert [image_id(item["image"]) for item in items] == ["i0", "i1", "i2", "i3", "i4"]
    assert all(set(item) == {"image", "label"} and Path(item["label"]).is_file() for item in items)
    (tmp_path / "l4.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="l4.nii.gz"):
        labels.segmentation_datalist(_Datastore(pairs))

    train, val = labels.random_split(items, 0.25, seed=0)
    assert len(val) == 1 and len(train) == 4  # round(5 * 0.25) = 1
    assert sorted(map(str, train + val)) == sorted(map(str, items))
    assert labels.random_split(items, 0.25, seed=0) == (train, val)  # fixed by the seed
    assert labels.random_split(items[:2], 0.9, seed=0)[0]  # at least one image is left to train on
    with pytest.raises(ValueError, match="at least two"):
        labels.random_split(items[:1], 0.25)
    with pytest.raises(ValueError, match="val_split must lie in"):
        labels.random_split(items, 1.0)


# --- through the separate environment -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_server(tmp_path_factory):
    env_bin = require_env()
    from monai_medmerge.bundle.example import make_segmentation_example

    root = tmp_path_factory.mktemp("monailabel_seg")
    example = make_segmentation_example(
        root / "example", n_train=4, n_test=2, widths=WIDTHS, source_epochs=1, progress=False
    )
    exported = train_and_export_segmentation(root / "train0", example, PATCH)
    bundle = root / "served" / MODEL
    shutil.copytree(exported, bundle)

    data = Path(example["datalist"]).parent
    datalist = json.loads(Path(example["datalist"]).read_text())
    pairs = {
        image_id(item["image"]): (data / item["image"], data / item["label"])
        for section in ("training", "validation", "test")
        for item in datalist[section]
    }
    studies = root / "studies"
    studies.mkdir()
    for image, _ in pairs.values():
        shutil.copy(image, studies / image.name)
    # one test image stored the other way round (both axes flipped, LPS): the preprocessing turns it to RAS, so its
    # mask is right only when the app maps the prediction back onto the study's own grid
    flipped = studies / f"{FLIPPED}.nii.gz"
    flip_image(pairs[FLIPPED_FROM][0], flipped)
    pairs[FLIPPED] = (flipped, None)
    server = MonaiLabelServer(
        env_bin,
        str(studies),
        {
            "models": str(bundle),
            "sources": ",".join(example["sources"]),
            "train_dir": str(root / "runs"),
            **APP_SETTINGS,
        },
        root / "monailabel_seg.log",
    )
    try:
        info = server.wait_ready()
        yield SimpleNamespace(
            server=server, info=info, bundle=bundle, example=example, pairs=pairs, studies=studies, root=root
        )
    finally:
        server.stop()


def flip_image(image: Path, target: Path) -> None:
    """``image`` (2-D) with both voxel axes reversed and the affine that keeps every voxel where it was in space."""
    source = nib.load(str(image))
    data = np.asarray(source.dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    nib.save(nib.Nifti1Image(data[::-1, ::-1].copy(), source.affine @ flip), str(target))


def reference_mask(example: dict, model_file: Path, image: Path) -> np.ndarray:
    """The label map of ``image`` computed here with the weights in ``model_file``: the training side's evaluation
    preprocessing, a sliding window of the patch size, argmax (the example's images are in RAS on their own grid, so
    nothing is to be inverted)."""
    import torch
    from monai.bundle import ConfigParser
    from monai.inferers import SlidingWindowInferer

    from monai_medmerge.data.pipelines import segmentation_transforms

    net = ConfigParser({"n": example["network_def"]}).get_parsed_content("n")
    net.load_state_dict(torch.load(model_file, weights_only=True))
    net.eval()
    pre = segmentation_transforms(kind="nifti", spatial_size=PATCH, train=False, modality="MR", label_key=None)
    inferer = SlidingWindowInferer(roi_size=PATCH, sw_batch_size=4, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        x = pre({"image": str(image)})["image"][None]
        return inferer(x, net).argmax(1)[0].numpy()


def check_mask(seg_server, image_key: str, model_file: Path, tag: str) -> tuple[dict, np.ndarray]:
    """Infer one study; the answer is a label map of the study's shape and affine, of label values only, equal to
    the one computed here with ``model_file``'s weights, and the params name that file."""
    params, mask_file = seg_server.server.infer_mask(MODEL, image_key, seg_server.root / f"masks_{tag}")
    image = seg_server.pairs[image_key][0]
    study, written = nib.load(str(image)), nib.load(str(mask_file))
    mask = np.asarray(written.dataobj)
    assert written.shape == study.shape, (image_key, written.shape, study.shape)
    np.testing.assert_allclose(written.affine, study.affine, atol=1e-5)
    assert written.get_data_dtype() == np.uint8
    assert set(np.unique(mask).tolist()) <= {0, 1, 2}
    if image_key == FLIPPED:  # the mask of the image it was made from, reversed as the study is
        expected = reference_mask(seg_server.example, model_file, seg_server.pairs[FLIPPED_FROM][0])[::-1, ::-1]
    else:
        expected = reference_mask(seg_server.example, model_file, image)
    np.testing.assert_array_equal(mask, expected)
    names = seg_server.example["label_names"]
    assert params["label_voxels"] == {name: int((mask == v).sum()) for v, name in enumerate(names)}
    assert params["model"]["sha256"] == sha256(model_file)
    return params, mask


def test_info_lists_a_segmentation_model_and_its_trainer(seg_server):
    model = seg_server.info["models"][MODEL]
    # MONAI Label's labels of a segmentation model: {name: value}, the background left out
    assert model["type"] == "segmentation" and model["dimension"] == 2
    assert model["labels"] == {"dim disc": 1, "bright disc": 2}
    trainer = seg_server.info["trainers"][MODEL]
    assert trainer["label_names"] == seg_server.example["label_names"] and trainer["label_tag"] == "final"
    # the app's --conf settings are the request defaults
    assert {k: trainer["config"][k] for k in APP_SETTINGS} == {
        "max_epochs": 1,
        "phase2_epochs": 2,
        "batch_size": 4,
        "val_split": 0.25,
    }
    assert seg_server.info["datastore"]["total"] == len(seg_server.pairs)


def test_infer_then_train_on_label_maps_then_infer_with_the_new_model(seg_server):
    server, bundle = seg_server.server, seg_server.bundle
    model_file = bundle / "models" / "model.pt"
    test_ids = [k for k in seg_server.pairs if k.startswith(("test_", "flipped_"))]
    assert FLIPPED in test_ids
    before_sha = sha256(model_file)
    previous = shutil.copy(model_file, seg_server.root / "served_before.pt")
    before = {k: check_mask(seg_server, k, Path(previous), "before")[1] for k in test_ids}

    # the label maps of the training and validation studies become the datastore's final labels
    labelled = [k for k in seg_server.pairs if k.startswith(("training_", "validation_"))]
    for key in labelled:
        assert server.save_label_map(key, seg_server.pairs[key][1])["label"] == key
    assert server.request("GET", "/info/")["datastore"]["label_tags"]["final"] == len(labelled)

    status = server.train(MODEL, {"seed": 1})
    assert any("merge training done" in line for line in status["details"]), status["details"]
    after_sha = sha256(model_file)
    assert after_sha != before_sha
    stats = server.request("GET", "/info/")["train_stats"][MODEL]
    # 8 labelled studies, val_split 0.25 from the app's settings; epochs from the app's settings too
    assert stats["sha256"] == after_sha and stats["images"] == {"train": 6, "validation": 2}
    assert stats["epochs"] == {"phase1": 1, "phase2": 2}
    run = Path(seg_server.root / "runs" / MODEL)
    assert (run / "models" / "phase1.done").is_file() and (run / "models" / "phase2.done").is_file()
    assert sha256(run / "previous_model.pt") == before_sha
    # the served bundle is still a segmentation bundle with the same labels, exported again
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["task"] == "segmentation"
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == list(
        seg_server.example["label_names"]
    )

    # the next infer request answers with the new weights: its masks are the ones computed with the new model.pt
    after = {k: check_mask(seg_server, k, model_file, "after")[1] for k in test_ids}
    assert any(not np.array_equal(before[k], after[k]) for k in test_ids)


def test_a_label_map_that_does_not_fit_its_study_stops_training_and_keeps_the_model(seg_server):
    """Run after the train test (the final labels are saved): one label map cut short fails the train request before
    any training, with a message that names the label map and its study; the served model stays."""
    server, model_file = seg_server.server, seg_server.bundle / "models" / "model.pt"
    key = next(k for k in seg_server.pairs if k.startswith("training_"))
    label = nib.load(str(seg_server.pairs[key][1]))
    cut = seg_server.root / "cut" / f"{key}.nii.gz"
    cut.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:-3], label.affine), str(cut))
    assert server.request("GET", "/info/")["datastore"]["label_tags"]["final"] > 1, "run the train test first"
    server.save_label_map(key, cut)
    served = sha256(model_file)
    status = server.train(MODEL, {}, expect="ERROR")
    details = "\n".join(status["details"])
    assert f"labels/final/{key}.nii.gz" in details and f"studies/{key}.nii.gz" in details, details[-3000:]
    assert sha256(model_file) == served
    params, _ = server.infer_mask(MODEL, key, seg_server.root / "masks_kept")
    assert params["model"]["sha256"] == served
