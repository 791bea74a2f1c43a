"""Phase 2 distilled from an ensemble (monai_medmerge.workflows.distillation): the loss, where the extra images come
from, the trainer wiring (epoch_length), and the training bundle's settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from monai_medmerge.workflows.distillation import (
    EnsembleDistillation,
    check_distillation,
    fine_tune_distilled,
    phase2_distillation,
    phase2_save_dict,
)

pytest.importorskip("ignite")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))


class Fixed(nn.Module):
    """A teacher that returns given logits and records what it saw and in which mode."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.seen, self.modes = logits, [], []

    def forward(self, x):
        self.seen.append(x.clone())
        self.modes.append((self.training, torch.is_grad_enabled()))
        return self.logits[: len(x)]


def _kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) summed over classes (dim 1), averaged over everything else, written out."""
    log_p = logits.log_softmax(1)
    return (target * (target.log() - log_p)).sum(1).mean()


def test_the_loss_is_the_labelled_loss_plus_weight_times_kl_to_the_teachers_mean():
    g = torch.Generator().manual_seed(0)
    t1, t2 = Fixed(torch.randn(4, 3, generator=g)), Fixed(torch.randn(4, 3, generator=g))
    pool = torch.randn(10, 2, generator=g)
    d = EnsembleDistillation([t1, t2], weight=0.5, unlabeled=pool, seed=0)
    x, y = torch.randn(4, 2, generator=g), torch.tensor([0, 1, 2, 1])
    inputs, label = d.prepare_batch({"image": x, "label": y})
    assert inputs.shape == (8, 2) and torch.equal(inputs[:4], x) and torch.equal(label, y)
    # the teachers saw the extra half, in eval mode and without gradients
    assert torch.equal(t1.seen[0], inputs[4:]) and t1.modes == [(False, False)] == t2.modes
    mean = (t1.logits.softmax(1) + t2.logits.softmax(1)) / 2
    pred = torch.randn(8, 3, generator=g)
    expected = nn.functional.cross_entropy(pred[:4], y) + 0.5 * _kl(mean, pred[4:])
    torch.testing.assert_close(d.loss(pred, y), expected)
    # segmentation-shaped outputs: the KL is averaged over voxels as well as images
    seg_teacher = Fixed(torch.randn(2, 3, 4, 4, generator=g))
    d = EnsembleDistillation([seg_teacher], weight=2.0, seed=0, task="segmentation")
    x, y = torch.randn(2, 1, 4, 4, generator=g), torch.randint(0, 3, (2, 1, 4, 4), generator=g)
    inputs, _ = d.prepare_batch((x, y))
    pred = torch.randn(4, 3, 4, 4, generator=g)
    expected = d.base_loss(pred[:2], y) + 2.0 * _kl(seg_teacher.logits.softmax(1), pred[2:])
    torch.testing.assert_close(d.loss(pred, y), expected)


def test_weight_zero_is_the_plain_loss_and_draws_nothing():
    teacher = Fixed(torch.zeros(4, 3))
    d = EnsembleDistillation([teacher], weight=0.0, seed=0)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 1])
    inputs, _ = d.prepare_batch((x, y))
    assert torch.equal(inputs, x) and teacher.seen == []
    pred = torch.randn(4, 3)
    torch.testing.assert_close(d.loss(pred, y), nn.functional.cross_entropy(pred, y))


def test_mixup_blends_pairs_of_the_batch_and_a_pool_tensor_gives_its_rows():
    teacher = Fixed(torch.zeros(6, 3))
    x = torch.arange(6.0).view(6, 1).repeat(1, 3)  # image i is constant i
    inputs, _ = EnsembleDistillation([teacher], seed=1).prepare_batch((x, torch.zeros(6, dtype=torch.long)))
    blends = inputs[6:]
    # each blend is constant (one weight per image) and lies between the smallest and largest image
    assert torch.all(blends == blends[:, :1]) and blends.min() >= 0 and blends.max() <= 5
    g = torch.Generator().manual_seed(1)  # the documented draw: a weight per image, then a partner per image
    lam, partner = torch.rand(6, 1, generator=g), torch.randperm(6, generator=g)
    torch.testing.assert_close(blends, lam * x + (1 - lam) * x[partner])
    assert not torch.equal(blends, blends.round())  # blends, not copies
    pool = torch.arange(100.0).view(50, 2)
    d = EnsembleDistillation([Fixed(torch.zeros(6, 3))], unlabeled=pool, seed=1)
    drawn = d.prepare_batch((torch.zeros(6, 2), torch.zeros(6, dtype=torch.long)))[0][6:]
    assert all(any(torch.equal(r, p) for p in pool) for r in drawn)
    again = EnsembleDistillation([Fixed(torch.zeros(6, 3))], unlabeled=pool, seed=1)
    assert torch.equal(again.prepare_batch((torch.zeros(6, 2), torch.zeros(6, dtype=torch.long)))[0][6:], drawn)


def test_a_loader_of_unlabelled_images_is_read_in_turn_cut_joined_and_restarted():
    images = torch.arange(7.0).view(7, 1)
    loader = DataLoader([{"image": im} for im in images], batch_size=3)  # batches of 3, 3, 1
    d = EnsembleDistillation([Fixed(torch.zeros(8, 2))], unlabeled=loader, seed=0)
    seen = []
    for _ in range(4):
        seen += d.prepare_batch((torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)))[0][2:, 0].tolist()
    # batch [0 1 2] cut to 2; [3 4 5] cut to 2; [6] joined with the restarted loader's [0 1 2] cut to 1; ...
    assert seen == [0, 1, 3, 4, 6, 0, 3, 4]
    wrong = DataLoader(torch.zeros(4, 2, 2), batch_size=2)
    d = EnsembleDistillation([Fixed(torch.zeros(2, 2))], unlabeled=wrong)
    with pytest.raises(ValueError, match=r"shape \(2, 2\), the labelled ones \(1,\): .* same preprocessing"):
        d.prepare_batch((torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)))
    d = EnsembleDistillation([Fixed(torch.zeros(2, 2))], unlabeled=[])
    with pytest.raises(ValueError, match="the unlabelled images are empty"):
        d.prepare_batch((torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)))


@pytest.mark.parametrize("source", ["mixup", "pool", "shuffled loader", "sampler with epochs"])
def test_a_resumed_distillation_draws_what_the_uninterrupted_one_would(tmp_path, source):
    """state_dict / load_state_dict (saved through a checkpoint file, as ResumableCheckpoint does): a fresh
    distillation loaded from the state after 5 steps draws exactly what the first one draws in steps 6-12, across
    the unlabelled loader's passes (7 batches a pass)."""
    from monai.data import DistributedSampler

    images = torch.arange(20.0).view(20, 1)

    def build() -> EnsembleDistillation:
        unlabeled = None
        if source == "pool":
            unlabeled = images
        elif source == "shuffled loader":  # the single-process bundle's loader: shuffled by its own generator
            unlabeled = DataLoader(images, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(4))
        elif source == "sampler with epochs":  # the torchrun overlay's loader: a new order each pass by set_epoch
            sampler = DistributedSampler(images, num_replicas=1, rank=0, shuffle=True, seed=4)
            unlabeled = DataLoader(images, batch_size=3, sampler=sampler)
        return EnsembleDistillation([Fixed(torch.zeros(4, 2))], unlabeled=unlabeled, seed=3)

    def step(d: EnsembleDistillation) -> list[float]:
        batch = (torch.arange(4.0).view(4, 1) * 0.1, torch.zeros(4, dtype=torch.long))
        return d.prepare_batch(batch)[0][4:, 0].tolist()

    first = build()
    for _ in range(5):
        step(first)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    expected = [step(first) for _ in range(7)]
    resumed = build()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert [step(resumed) for _ in range(7)] == expected
    # without the state the draws differ: the test can tell
    assert [step(build()) for _ in range(7)] != expected
    with pytest.raises(ValueError, match="saved state lacks passes, read"):
        build().load_state_dict({"generator": first.generator.get_state()})


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no teacher"):
        EnsembleDistillation([])
    with pytest.raises(ValueError, match="teacher 1 is a str"):
        EnsembleDistillation([nn.Linear(2, 2), "net"])
    with pytest.raises(ValueError, match="weight must be >= 0"):
        EnsembleDistillation([nn.Linear(2, 2)], weight=-1)
    with pytest.raises(ValueError, match="tensor of unlabelled images is empty"):
        EnsembleDistillation([nn.Linear(2, 2)], unlabeled=torch.zeros(0, 2))
    with pytest.raises(ValueError, match="distill_weight=1.0 needs recipe: paper"):
        check_distillation("direct", 1.0)
    with pytest.raises(ValueError, match="distill_weight must be >= 0"):
        check_distillation("paper", -0.5)
    with pytest.raises(ValueError, match="distill_weight must be a number"):
        check_distillation("paper", "much")
    with pytest.raises(ValueError, match="unlabeled_section='unlabeled' is only read by the distilled phase 2"):
        check_distillation("paper", 0, "unlabeled")
    with pytest.raises(ValueError, match="phase2_steps_per_epoch must be an integer >= 1 or null"):
        check_distillation("paper", 1.0, None, 0)
    assert check_distillation("direct", 0) == {"weight": 0.0, "unlabeled_section": None, "steps_per_epoch": None}
    assert phase2_distillation("direct", 0, []) is None
    assert isinstance(phase2_distillation("paper", 1, [nn.Linear(2, 2)]), EnsembleDistillation)


def test_phase0_room_is_the_validation_lead_of_the_ensemble_over_its_best_network(tmp_path):
    """Two networks each sure where it is right and unsure where it is wrong, on different halves: each scores
    0.5 alone, their ensemble (mean probabilities) is right everywhere, so the room is 0.5."""
    from monai_medmerge.workflows.recipes import phase0_room

    x = torch.arange(4.0).view(4, 1)
    y = torch.tensor([0, 1, 0, 1])
    sure, unsure = 10.0, 1.0

    class Known(nn.Module):
        def __init__(self, right: set[int]) -> None:
            super().__init__()
            self.right = right

        def forward(self, inputs):
            out = []
            for i in inputs[:, 0].long().tolist():
                label = int(y[i])
                guess, strength = (label, sure) if i in self.right else (1 - label, unsure)
                out.append([strength if c == guess else 0.0 for c in (0, 1)])
            return torch.tensor(out)

    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    room = phase0_room([Known({0, 1}), Known({2, 3})], loader, path=tmp_path / "room.json")
    assert room["networks"] == pytest.approx([0.5, 0.5])  # half of each class right: F1 0.5 for both classes
    assert room["ensemble"] == pytest.approx(1.0) and room["room"] == pytest.approx(0.5)
    assert room["images"] == 4
    written = json.loads((tmp_path / "room.json").read_text())
    assert written["networks"] == pytest.approx(room["networks"]) and written.keys() == room.keys()
    assert (written["ensemble"], written["room"]) == pytest.approx((room["ensemble"], room["room"]))


def test_the_bundle_distillation_warns_when_phase0_found_no_room(tmp_path, caplog):
    import logging

    path = tmp_path / "phase0_room.json"
    teachers = [nn.Linear(2, 2)]
    with caplog.at_level(logging.WARNING, logger="monai_medmerge.workflows.distillation"):
        path.write_text(json.dumps({"networks": [0.5, 0.6], "ensemble": 0.58, "room": -0.02}))
        assert isinstance(phase2_distillation("paper", 1.0, teachers, room_path=path), EnsembleDistillation)
        assert "led the best of them by -0.020 macro-F1" in caplog.text and "consider distill_weight: 0" in caplog.text
        caplog.clear()
        path.write_text(json.dumps({"networks": [0.5, 0.6], "ensemble": 0.65, "room": 0.05}))
        phase2_distillation("paper", 1.0, teachers, room_path=path)
        phase2_distillation("paper", 1.0, teachers, room_path=tmp_path / "missing.json")  # phase 0 wrote none
        assert caplog.text == ""
        path.write_text("{}")
        phase2_distillation("paper", 1.0, teachers, room_path=path)
        assert "could not read the room of phase 0" in caplog.text


def _task(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # three classes from two directions


def test_fine_tune_distilled_trains_epoch_length_steps_and_moves_the_student_to_the_teacher():
    """With only 6 labelled examples the student alone learns little; distilled on 512 unlabelled inputs from a
    teacher that knows the rule, it agrees with that teacher far more often on fresh inputs."""
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    with torch.no_grad():  # a teacher that knows the task: logits of the three classes
        teacher.weight.copy_(torch.tensor([[-4.0, -4.0, 0, 0], [0.0, 0.0, 0, 0], [4.0, 4.0, 0, 0]]))
        teacher.bias.zero_()
    x, y = _task(6, 1)
    train = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(*_task(60, 2)), batch_size=30)
    fresh, _ = _task(500, 3)
    pool = _task(512, 4)[0]
    agreement = {}
    for name, weight in (("alone", 0.0), ("distilled", 1.0)):
        torch.manual_seed(5)
        student = nn.Linear(4, 3)
        _, history = fine_tune_distilled(
            student, [teacher], train, val, unlabeled=pool, weight=weight, epoch_length=10,
            epochs=10, lr=0.05, patience=None, progress=False,
        )  # fmt: skip
        assert len(history.train_loss) == 10
        agreement[name] = (student(fresh).argmax(1) == teacher(fresh).argmax(1)).float().mean().item()
    assert agreement["distilled"] > agreement["alone"] + 0.2 and agreement["distilled"] > 0.7, agreement


def test_epoch_length_sets_the_steps_of_an_epoch():
    from ignite.engine import Events

    from monai_medmerge.workflows import engines

    net = nn.Linear(4, 3)
    x, y = _task(6, 1)
    train = DataLoader(TensorDataset(x, y), batch_size=3)
    evaluator = engines.phase_evaluator(net, DataLoader(TensorDataset(x, y), batch_size=3), num_classes=3)
    optimizer = torch.optim.Adam(net.parameters())
    trainer = engines.phase_trainer(net, train, evaluator, optimizer, 2, epoch_length=7, progress=False)
    count = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: count.append(e.state.epoch))
    trainer.run()
    assert count == [1] * 7 + [2] * 7
    with pytest.raises(ValueError, match="epoch_length must be >= 1"):
        engines.phase_trainer(net, train, evaluator, optimizer, 2, epoch_length=0, progress=False)


def test_bundle_distilled_phase2_learns_from_the_phase0_ensemble(example_workspace, tmp_path):
    """``distill_weight`` > 0 changes phase 2 (mixup blends without a section, the section's images with one), the
    result stays a plain network_def state dict; ``phase2_start: anchor`` fine-tunes (and distils into) the anchor's
    phase-0 network with no merge; bad settings fail when the run starts, before any training."""
    from bundle_utils import bundle_copy, datalist_with_unlabeled, overrides, run_bundle

    from monai_medmerge.sources import load_checkpoint
    from monai_medmerge.workflows.engines import latest_checkpoint

    example = example_workspace
    root = bundle_copy(tmp_path / "bundle")
    datalist = datalist_with_unlabeled(example, tmp_path / "data")
    base = dict(recipe="paper", phase0_epochs=2, datalist=datalist)
    proc = run_bundle(root, ["train.yaml"], overrides(example, root, **base), run_id="phase0")
    assert proc.returncode == 0, proc.stdout[-4000:]
    models = root / "models"
    room = json.loads((models / "phase0_room.json").read_text())  # the room, measured after phase 0
    assert len(room["networks"]) == 2 and room["room"] == pytest.approx(room["ensemble"] - max(room["networks"]))
    assert "phase 0, validation macro-F1: networks" in proc.stdout
    results = {}
    for name, more in (
        ("plain", {}),
        ("mixup", {"distill_weight": 1.0, "phase2_steps_per_epoch": 4}),
        ("pool", {"distill_weight": 1.0, "phase2_steps_per_epoch": 4, "unlabeled_section": "unlabeled"}),
    ):
        proc = run_bundle(root, ["train.yaml"], overrides(example, root, **base, **more))  # phases 1 and 2
        assert proc.returncode == 0, (name, proc.stdout[-4000:])
        results[name] = load_checkpoint(models / "model.pt")
        # a distilled phase 2 checkpoints where its draws stand (a resume continues them); a plain one has none
        saved = torch.load(latest_checkpoint(models, "phase2"), weights_only=True)
        assert ("distillation" in saved) == (name != "plain"), (name, list(saved))
        if name == "pool":  # 4 steps an epoch of 8 labelled images: 32 unlabelled images an epoch, from a pool of 20
            assert saved["distillation"]["passes"] >= 2 and saved["distillation"]["read"] >= 1
    # phase2_start: anchor skips phase 1 and fine-tunes the anchor's phase-0 network: at a learning rate of 0 its
    # parameters are exactly that network's (the norm layers' running statistics still move in training mode)
    (models / "phase1_best.pt").unlink()
    still = dict(phase2_start="anchor", anchor=1, finetune_lr=0.0, phase2_epochs=1, val_interval=1)
    proc = run_bundle(root, ["train.yaml"], overrides(example, root, **base, **still))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert not (models / "phase1_best.pt").exists()
    anchored, phase0 = load_checkpoint(models / "model.pt"), load_checkpoint(models / "phase0_source1.pt")
    weights = [k for k in phase0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(anchored[k], phase0[k]) for k in weights)
    other = load_checkpoint(models / "phase0_source0.pt")
    assert any(not torch.equal(anchored[k], other[k]) for k in weights)
    more = {"distill_weight": 1.0, "phase2_steps_per_epoch": 4, "unlabeled_section": "unlabeled"}
    proc = run_bundle(root, ["train.yaml"], overrides(example, root, **base, **more, phase2_start="anchor"))
    assert proc.returncode == 0, proc.stdout[-4000:]
    results["anchor_pool"] = load_checkpoint(models / "model.pt")
    names = list(results)
    assert all(results[n].keys() == results["plain"].keys() for n in names)
    for i, a in enumerate(names):  # each setting trains another network at the same seed
        for b in names[i + 1 :]:
            assert any(not torch.equal(results[a][k], results[b][k]) for k in results[a]), (a, b)

    def refused(message: str, run_id: str = "paper", **more) -> None:
        before = {p.name for p in models.iterdir()}
        proc = run_bundle(root, ["train.yaml"], overrides(example, root, **more), run_id=run_id)
        assert proc.returncode != 0 and message in proc.stdout, proc.stdout[-3000:]
        assert {p.name for p in models.iterdir()} == before  # refused before anything was written

    refused("distill_weight=1.0 needs recipe: paper", run_id="run", datalist=datalist, distill_weight=1.0)
    refused("phase2_start: anchor needs recipe: paper", run_id="run", datalist=datalist, phase2_start="anchor")
    refused("phase2_start must be one of merge, anchor", **base, phase2_start="source")
    refused("is only read by the distilled phase 2", **base, unlabeled_section="unlabeled")
    refused("need a section of their own", **base, distill_weight=1.0, unlabeled_section="training")
    refused("has none of the sections pool", **base, distill_weight=1.0, unlabeled_section="pool")
    leaked = json.loads(datalist.read_text())
    leaked["unlabeled"].append({"image": leaked["validation"][0]["image"]})
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps(leaked))
    refused(
        "of 'validation' and item",
        **dict(base, datalist=leaky),
        distill_weight=1.0,
        unlabeled_section="unlabeled",
    )


def test_phase2_save_dict_holds_the_distillation_only_when_there_is_one(tmp_path):
    """The bundles' phase-2 checkpoint: network and optimizer, plus the draws of a distilled phase 2, restored."""
    network = nn.Linear(1, 2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    assert phase2_save_dict(network, optimizer) == {"model": network, "optimizer": optimizer}
    assert phase2_save_dict(network, optimizer, None) == {"model": network, "optimizer": optimizer}

    def build() -> EnsembleDistillation:
        return EnsembleDistillation([Fixed(torch.zeros(4, 2))], unlabeled=torch.arange(20.0).view(20, 1), seed=3)

    def step(d: EnsembleDistillation) -> list[float]:
        return d.prepare_batch((torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)))[0][4:, 0].tolist()

    distillation = build()
    saved = phase2_save_dict(network, optimizer, distillation)
    assert saved == {"model": network, "optimizer": optimizer, "distillation": distillation}
    step(distillation)
    torch.save({k: v.state_dict() for k, v in saved.items()}, tmp_path / "phase2.pt")
    fresh = build()
    fresh.load_state_dict(torch.load(tmp_path / "phase2.pt", weights_only=True)["distillation"])
    assert step(fresh) == step(distillation) != step(build())
