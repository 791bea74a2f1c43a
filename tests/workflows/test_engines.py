from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_source
from monai.bundle import ConfigParser

from monai_medmerge.bundle.example import example_network_def
from monai_medmerge.networks import KernelMerge
from monai_medmerge.sources import save_checkpoint
from monai_medmerge.workflows.engines import (
    BestState,
    ClassificationScore,
    ResumableCheckpoint,
    check_training,
    collapse_merge,
    latest_checkpoint,
    load_sources,
    merge_parameter_groups,
)
from monai_medmerge.workflows.metrics import classification_metrics

pytest.importorskip("ignite")

RECIPE = (8, 8, 16, 16)  # widths of the test network
HEAD = "fc"


def build_network(num_classes: int, widths) -> torch.nn.Module:
    """The example bundle's small 2-D MONAI ResNet for 1-channel patches."""
    return ConfigParser({"n": example_network_def(num_classes, widths)}).get_parsed_content("n")


NET_DEF = {
    "_target_": "monai.networks.nets.ResNet",
    "block": "basic",
    "layers": [1, 1, 1, 1],
    "block_inplanes": [8, 8, 16, 16],
    "spatial_dims": 2,
    "n_input_channels": 1,
    "conv1_t_size": 3,
    "conv1_t_stride": 1,
    "no_max_pool": True,
}


def _sources():
    return [
        make_source(lambda num_classes: build_network(num_classes, RECIPE), s, num_classes=c)
        for s, c in ((0, 3), (1, 5))
    ]


def test_load_sources_from_checkpoints_and_bundles(tmp_path):
    a, b = _sources()
    save_checkpoint(a, tmp_path / "a.pt")
    bundle = tmp_path / "b"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    save_checkpoint(b, bundle / "models" / "model.pt")
    (bundle / "configs" / "inference.json").write_text(
        '{"network_def": ' + str({**NET_DEF, "num_classes": 5}).replace("'", '"').replace("True", "true") + "}"
    )
    loaded = load_sources([{"checkpoint": tmp_path / "a.pt", "network_def": {**NET_DEF, "num_classes": 3}}, bundle])
    for got, want in zip(loaded, (a, b), strict=True):
        for k, v in want.state_dict().items():
            assert torch.equal(got.state_dict()[k], v)


@pytest.mark.parametrize(
    "specs, message",
    [
        (["only_one"], "at least two sources"),
        ([{"bundle": "x", "checkpoint": "y"}, "z"], r"sources\[0\] needs exactly one of 'bundle' or 'checkpoint'"),
        ([{"checkpoint": "x.pt"}, "z"], r"sources\[0\]: checkpoint x.pt needs a 'network_def'"),
        (["z", {"bundle": "x", "weights": 1}], r"sources\[1\] has unknown field\(s\) \['weights'\]"),
    ],
)
def test_load_sources_errors(specs, message):
    with pytest.raises(ValueError, match=message):
        load_sources(specs)


def test_parameter_groups_split_coefficients_and_head():
    merge = KernelMerge(_sources(), head="fc", out_channels=4, anchor=0)
    groups = merge_parameter_groups(merge, coef_lr=0.01, head_lr=0.001)
    assert [g["lr"] for g in groups] == [0.01, 0.001]
    assert groups[0]["params"] == [merge.merge_logits]
    head = {id(p) for p in merge.network.fc.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head
    with pytest.raises(ValueError, match="no parameter named 'merge_logits'"):
        merge_parameter_groups(_sources()[0], 0.01, 0.001)


def test_collapse_merge_loads_the_phase1_checkpoint(tmp_path):
    from monai.bundle import ConfigParser

    trained = KernelMerge(_sources(), head="fc", out_channels=4, anchor=0)
    with torch.no_grad():
        trained.merge_logits.normal_()
        trained.network.fc.weight.normal_()
    save_checkpoint(trained.state_dict(), tmp_path / "phase1_best.pt")
    fresh = KernelMerge(_sources(), head="fc", out_channels=4, anchor=0)
    plain = ConfigParser({"n": {**NET_DEF, "num_classes": 4}}).get_parsed_content("n")
    got = collapse_merge(fresh, tmp_path / "phase1_best.pt", network_def=plain)
    assert got is plain
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got.eval()(x), trained.collapse().eval()(x))
    with pytest.raises(FileNotFoundError, match="missing.pt not found: run phase 1 first"):
        collapse_merge(fresh, tmp_path / "missing.pt")
    wrong = ConfigParser({"n": {**NET_DEF, "num_classes": 6}}).get_parsed_content("n")
    with pytest.raises(ValueError, match="does not fit network_def"):
        collapse_merge(fresh, None, network_def=wrong)


@pytest.mark.parametrize("score", ["macro_f1", "accuracy", "balanced_accuracy", "auroc"])
def test_classification_score_equals_the_metrics_over_all_updates(score):
    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(50, 4))).float(), 1)
    labels = torch.from_numpy(rng.integers(0, 4, 50))
    metric = ClassificationScore(score, num_classes=4)
    metric.reset()
    for i in range(0, 50, 16):  # per-item lists as MONAI evaluators pass them; one batch with one-hot labels
        p, y = list(probs[i : i + 16]), list(labels[i : i + 16])
        if i == 16:
            y = list(torch.nn.functional.one_hot(labels[i : i + 16], 4))
        metric.update((p, y))
    expected = classification_metrics(labels.numpy(), probs.numpy(), 4)[score]
    assert metric.compute() == pytest.approx(expected)
    with pytest.raises(ValueError, match="score must be one of"):
        ClassificationScore("f2")


def _dying_save(real_save):
    def dying_save(obj, f, *args, **kwargs):  # writes half a file, then the process "dies"
        real_save(obj, f, *args, **kwargs)
        if hasattr(f, "truncate"):
            f.truncate(10)
        raise KeyboardInterrupt("killed while saving")

    return dying_save


def test_resumable_checkpoint_keeps_the_last_checkpoint_when_a_save_dies(tmp_path, monkeypatch):
    from ignite.engine import Engine

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    ResumableCheckpoint(tmp_path, "p", {"model": net, "optimizer": opt}).attach(engine)
    engine.run([0], max_epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p_checkpoint_epoch=2.pt"]  # the older one is gone
    before = torch.load(tmp_path / "p_checkpoint_epoch=2.pt", weights_only=True)
    assert before["trainer"]["iteration"] == 2 and set(before) == {"model", "optimizer", "trainer"}

    monkeypatch.setattr(torch, "save", _dying_save(torch.save))
    with pytest.raises(KeyboardInterrupt):
        engine.run([0], max_epochs=3)
    monkeypatch.undo()
    # the interrupted save left neither a temporary file nor a damaged checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p_checkpoint_epoch=2.pt"]
    after = torch.load(tmp_path / "p_checkpoint_epoch=2.pt", weights_only=True)
    assert torch.equal(after["model"]["weight"], before["model"]["weight"])
    assert torch.equal(after["model"]["weight"], net.weight.detach())


def test_resumable_checkpoint_continues_after_the_saved_epoch(tmp_path):
    from ignite.engine import Engine, Events

    net = torch.nn.Linear(2, 2)
    first = Engine(lambda e, b: None)
    ResumableCheckpoint(tmp_path, "p", {"model": net}).attach(first)
    first.run([0, 0], max_epochs=3)
    with torch.no_grad():
        saved = net.weight.clone()
        net.weight.zero_()
    epochs = []
    second = Engine(lambda e, b: None)
    second.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    handler = ResumableCheckpoint(tmp_path, "p", {"model": net}, resume=True)
    handler.attach(second)
    second.run([0, 0], max_epochs=5)
    assert handler.loaded == tmp_path / "p_checkpoint_epoch=3.pt"
    assert epochs == [4, 5]
    assert torch.equal(net.weight.detach(), saved)
    with pytest.raises(ValueError, match="must not hold 'trainer'"):
        ResumableCheckpoint(tmp_path, "p", {"trainer": net})


def test_latest_checkpoint_is_the_highest_epoch(tmp_path):
    assert latest_checkpoint(tmp_path, "phase1") is None
    for name in ("phase1_checkpoint_epoch=2.pt", "phase1_checkpoint_epoch=10.pt", "phase2_checkpoint_epoch=30.pt"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path, "phase1").name == "phase1_checkpoint_epoch=10.pt"


def test_best_state_writes_the_best_and_survives_a_dying_save(tmp_path, monkeypatch):
    from ignite.engine import Engine

    net = torch.nn.Linear(2, 2)
    trainer = Engine(lambda e, b: None)
    evaluator = Engine(lambda e, b: None)
    scores = iter([0.5, 0.7, 0.6, 0.9])

    def validated(e):  # what MONAI's evaluator records after computing its key metric
        score = next(scores)
        e.state.epoch = trainer.state.epoch
        if score > getattr(e.state, "best_metric", -1):
            e.state.best_metric, e.state.best_metric_epoch = score, e.state.epoch
        with torch.no_grad():
            net.weight.add_(1.0)

    from ignite.engine import Events

    evaluator.add_event_handler(Events.EPOCH_COMPLETED, validated)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
    best = BestState(net, trainer, tmp_path / "best.pt")
    best.attach(evaluator)
    weights = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: weights.append(net.weight.detach().clone()))
    trainer.run([0], max_epochs=3)
    # epoch 2 (score 0.7) is the best of three: its state is in the file and back in the network
    assert torch.equal(torch.load(tmp_path / "best.pt", weights_only=True)["weight"], weights[1])
    assert torch.equal(net.weight.detach(), weights[1])
    assert trainer.state.best_metric == 0.7 and trainer.state.best_metric_epoch == 2

    monkeypatch.setattr(torch, "save", _dying_save(torch.save))
    with pytest.raises(KeyboardInterrupt):
        trainer.run([0], max_epochs=4)  # epoch 4 improves (0.9) and dies while saving
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.best.json"]  # state, score record
    assert torch.equal(torch.load(tmp_path / "best.pt", weights_only=True)["weight"], weights[1])


def test_segmentation_evaluator_scores_mean_dice_of_the_argmax():
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric

    from monai_medmerge.workflows.engines import default_loss, phase_evaluator

    g = torch.Generator().manual_seed(0)
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    images = torch.randn(6, 1, 12, 12, generator=g)
    labels = torch.randint(0, 3, (6, 1, 12, 12), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    evaluator = phase_evaluator(net, loader, num_classes=3, task="segmentation")
    evaluator.run()
    assert evaluator.state.key_metric_name == "val_mean_dice"
    with torch.no_grad():
        pred = net(images).argmax(1, keepdim=True)
    dice = DiceMetric(include_background=False, num_classes=3)
    dice(pred, labels)
    expected = float(dice.aggregate())
    assert 0.0 < expected < 1.0
    assert evaluator.state.metrics["val_mean_dice"] == pytest.approx(expected, rel=1e-6)
    # the loss of the task, and a clear refusal of an unknown task or a missing class count
    assert isinstance(default_loss("segmentation"), DiceCELoss)
    assert isinstance(default_loss(), torch.nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="task must be one of classification, segmentation"):
        phase_evaluator(net, loader, task="detection")
    with pytest.raises(ValueError, match="needs num_classes"):
        phase_evaluator(net, loader, task="segmentation")


def test_learn_coefficients_and_fine_tune_take_label_maps():
    """Phase 1 and phase 2 of the Python API on a segmentation task (DiceCE, mean Dice)."""
    from monai.networks.nets import UNet

    from monai_medmerge.workflows import fine_tune, learn_coefficients

    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 1, 32, 32, generator=g)
    labels = (images > 0.5).long() + (images > 1.5).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    sources = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sources.append(UNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0))
    merge = KernelMerge(sources, head="auto", out_channels=3, example_input=images[:2])
    seg = {"task": "segmentation", "num_classes": 3}
    plain, hist1 = learn_coefficients(merge, loader, loader, epochs=1, progress=False, **seg)
    assert "mean_dice" in hist1.val[0] and plain(images[:1]).shape == (1, 3, 32, 32)
    tuned, hist2 = fine_tune(plain, loader, loader, epochs=1, progress=False, **seg)
    assert 0.0 <= hist2.best_score <= 1.0 and "mean_dice" in hist2.val[0]


def test_training_settings_are_checked_by_name():
    check_training(
        batch_size=8, coef_lr=0.01, phase1_epochs=1, phase0_head_epochs=0, patience=None, val_interval=2, sw_overlap=0
    )
    check_training(patience=3, finetune_lr=0, phase2_epochs=2.0)  # YAML may give a whole number as a float
    for bad, message in [
        ({"phase2_epochs": -1}, "phase2_epochs must be an integer >= 1, got -1."),
        ({"phase1_epochs": 0}, "phase1_epochs must be an integer >= 1, got 0."),
        ({"phase0_head_epochs": 1.5}, "phase0_head_epochs must be an integer >= 0, got 1.5."),
        ({"coef_lr": -0.1}, "coef_lr must be a number >= 0, got -0.1."),
        ({"head_lr": "0.01"}, "head_lr must be a number >= 0, got '0.01'."),
        ({"patience": 0}, "patience must be an integer >= 1, or null for no early stopping, got 0."),
        ({"batch_size": True}, "batch_size must be an integer >= 1, got True."),
        ({"sw_overlap": 1.0}, "sw_overlap must be a number in [0, 1), got 1.0."),
        ({"seed": 1}, "check_training: no rule for the setting 'seed'."),
    ]:
        with pytest.raises(ValueError) as e:
            check_training(val_interval=1, **bad)
        assert str(e.value) == message
