"""One training path: the Python API and the training bundle build their phases with the same engine functions;
early stopping and best-state semantics; metrics that never give a silent NaN AUROC."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from torch.utils.data import DataLoader, TensorDataset

from monai_medmerge.bundle.example import example_network_def
from monai_medmerge.networks import KernelMerge
from monai_medmerge.workflows import engines, fine_tune, fit, learn_coefficients
from monai_medmerge.workflows.metrics import classification_metrics

pytest.importorskip("ignite")

RECIPE = (4, 8, 8, 8)  # widths of the test network
HEAD = "fc"


def build_network(num_classes: int, widths) -> torch.nn.Module:
    """The example bundle's small 2-D MONAI ResNet for 1-channel patches."""
    return ConfigParser({"n": example_network_def(num_classes, widths)}).get_parsed_content("n")


BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "medmerge_classification"


def _loader(seed: int = 0, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(48) % 3
    x = torch.randn(48, 1, 16, 16, generator=g) + y.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(1))


def _merge() -> KernelMerge:
    torch.manual_seed(0)
    sources = [build_network(2, RECIPE), build_network(5, RECIPE)]
    return KernelMerge(sources, head=HEAD, out_channels=3, anchor=1, anchor_weight=0.9)


class _Spy:
    """Wraps an engine builder and records every network it was given."""

    def __init__(self, fn):
        self.fn, self.networks = fn, []

    def __call__(self, network, *args, **kwargs):
        self.networks.append(network)
        return self.fn(network, *args, **kwargs)


def test_python_api_and_bundle_build_phases_with_the_same_functions(example_workspace, monkeypatch):
    from monai.bundle import ConfigParser

    trainer_spy, evaluator_spy = _Spy(engines.phase_trainer), _Spy(engines.phase_evaluator)
    monkeypatch.setattr(engines, "phase_trainer", trainer_spy)
    monkeypatch.setattr(engines, "phase_evaluator", evaluator_spy)

    merge = _merge()
    learn_coefficients(merge, _loader(), _loader(), epochs=1, progress=False)
    net, _ = fine_tune(build_network(3, RECIPE), _loader(), _loader(), epochs=1, progress=False)
    assert trainer_spy.networks == [merge, net] and evaluator_spy.networks == [merge, net]

    # the bundle's phase 1 and phase 2 (train#trainer, finetune#trainer) resolve to the same (patched) functions
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update(
        {
            "bundle_root": str(Path(example_workspace["datalist"]).parent),
            "dataset_dir": str(Path(example_workspace["datalist"]).parent),
            "sources": example_workspace["sources"],
            "class_names": example_workspace["class_names"],
            "network_args#block_inplanes": [8, 16, 16, 32],
            "progress": False,
            "train#trainer#max_epochs": 3,  # the id MONAI Label overrides
        }
    )
    trainer = parser.get_parsed_content("train#trainer")
    phase1_network = parser.get_parsed_content("train#network")
    assert trainer_spy.networks[-1] is phase1_network and evaluator_spy.networks[-1] is phase1_network
    assert isinstance(phase1_network, KernelMerge)
    assert trainer.state.max_epochs == 3
    assert parser.get("finetune#trainer#_target_") == parser.get("train#trainer#_target_")
    assert parser.get("train#trainer#_target_") == "monai_medmerge.workflows.engines.phase_trainer"
    assert parser.get("validate#evaluator#_target_") == "monai_medmerge.workflows.engines.phase_evaluator"


class _Signed(torch.nn.Module):
    """Logits ``(s * x, -s * x)`` of a 1-feature input: macro-F1 is 1 while ``s > 0`` and 0 once ``s < 0``."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(s))

    def forward(self, x):
        z = x.reshape(len(x), -1)[:, :1] * self.s
        return torch.cat([z, -z], dim=1)


def _signed_data() -> DataLoader:
    x = torch.tensor([1.0, 2.0, -1.0, -2.0]).reshape(4, 1)
    y = torch.tensor([0, 0, 1, 1])
    return DataLoader(TensorDataset(x, y), batch_size=4)


def test_early_stopping_keeps_the_best_state():
    # the loss drives s from +0.25 downwards: validation macro-F1 is 1, 1, 0, 0, ... so epoch 0 is the best (a tie
    # does not replace the best) and, with patience 2, training stops after epoch 2
    model = _Signed(0.25)

    def loss(pred, label):
        return model.s * 1.0  # Adam moves s down by about lr per step

    history = fit(
        model,
        _signed_data(),
        _signed_data(),
        [{"params": [model.s], "lr": 0.1}],
        epochs=20,
        patience=2,
        progress=False,
        loss_function=loss,
    )
    scores = [v["macro_f1"] for v in history.val]
    assert scores[:2] == [1.0, 1.0] and scores[2] < 1.0, scores
    assert history.best_epoch == 0 and history.best_score == 1.0
    assert len(history.val) == history.best_epoch + 2 + 1 < 20  # stopped after `patience` epochs without a gain
    assert len(history.train_loss) == len(history.val)
    # the model ends in the state of epoch 0 (one Adam step of lr 0.1 from 0.25), not the last epoch's state
    assert model.s.item() == pytest.approx(0.15, abs=1e-4)
    # without patience every epoch runs, and the best state is still the one kept
    model = _Signed(0.25)
    history = fit(
        model,
        _signed_data(),
        _signed_data(),
        [{"params": [model.s], "lr": 0.1}],
        epochs=6,
        patience=None,
        progress=False,
        loss_function=loss,
    )
    assert len(history.val) == 6 and history.best_epoch == 0
    assert model.s.item() == pytest.approx(0.15, abs=1e-4)


def test_later_improvement_replaces_the_best_state():
    # s rises from -0.25: macro-F1 0, 0, 1, ... (scores at s < 0 are 0): the first epoch with s > 0 is kept
    model = _Signed(-0.25)
    history = fit(
        model,
        _signed_data(),
        _signed_data(),
        [{"params": [model.s], "lr": 0.1}],
        epochs=4,
        patience=2,
        progress=False,
        loss_function=lambda pred, label: -model.s,
    )
    scores = [v["macro_f1"] for v in history.val]
    assert scores == [0.0, 0.0, 1.0, 1.0], scores
    assert history.best_epoch == 2 and history.best_score == 1.0
    assert model.s.item() == pytest.approx(0.05, abs=1e-4)


def test_phase1_trains_only_coefficients_and_head():
    merge = _merge()
    # the stacked source weights: buffers other than norm statistics
    frozen = {k: v.clone() for k, v in merge.named_buffers() if "running" not in k and "num_batches" not in k}
    assert len(frozen) > 5, sorted(frozen)
    start = merge.merge_logits.detach().clone()
    plain, history = learn_coefficients(merge, _loader(), _loader(), epochs=3, lr=0.05, progress=False)
    assert not torch.equal(merge.merge_logits.detach(), start)
    buffers = dict(merge.named_buffers())
    for k, v in frozen.items():
        assert torch.equal(buffers[k], v), k
    assert type(plain) is type(build_network(3, RECIPE)) and not plain.training
    assert 0 <= history.best_epoch < 3 and len(history.val) == 3


def test_fit_rejects_bad_arguments():
    net = build_network(3, RECIPE)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        fit(net, _loader(), _loader(), [{"params": net.parameters(), "lr": 0.1}], epochs=0, progress=False)
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        fit(net, _loader(), _loader(), [{"params": net.parameters(), "lr": 0.1}], epochs=1, progress=False)


def test_a_negative_learning_rate_is_refused_not_trained():
    """torch's Adam checks only its default lr: a negative group lr would ascend the loss without a word."""
    with pytest.raises(ValueError, match=r"learning rate of parameter group 0 must be >= 0, got -0\.1"):
        fine_tune(build_network(3, RECIPE), _loader(), _loader(), epochs=1, lr=-0.1, progress=False)
    with pytest.raises(ValueError, match=r"learning rate of parameter group 1 must be >= 0, got -0\.001"):
        learn_coefficients(_merge(), _loader(), _loader(), epochs=1, head_lr=-0.001, progress=False)


def test_loss_function_replaces_the_cross_entropy():
    seen = []

    def towards_class_two(pred, label):
        seen.append((pred.shape[0], label.shape[0]))
        return torch.nn.functional.cross_entropy(pred, torch.full_like(label, 2))

    torch.manual_seed(0)
    net = build_network(3, RECIPE)
    x, y = _loader().dataset.tensors
    with torch.no_grad():
        net.train()
        expected = torch.stack([torch.nn.functional.cross_entropy(net(b), torch.full((16,), 2)) for b in x.split(16)])
        plain_ce = torch.stack(
            [torch.nn.functional.cross_entropy(net(b), t) for b, t in zip(x.split(16), y.split(16), strict=True)]
        )
    # lr 0: the weights stay put, so the recorded loss is the custom loss on the starting weights
    _, history = fine_tune(net, _loader(), _loader(), epochs=1, lr=0.0, progress=False, loss_function=towards_class_two)
    assert seen == [(16, 16)] * 3
    assert history.train_loss[0] == pytest.approx(expected.mean().item(), abs=1e-5)
    assert abs(expected.mean() - plain_ce.mean()) > 1e-3


def _metrics_cases():
    rng = np.random.default_rng(0)
    for classes in (2, 3, 5):
        y = rng.integers(0, classes, 60)
        y[:classes] = np.arange(classes)
        p = rng.random((60, classes))
        yield y, p / p.sum(1, keepdims=True)


def test_metrics_equal_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    for y, p in _metrics_cases():
        got = classification_metrics(y, p)
        pred = p.argmax(1)
        auroc = sk.roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else sk.roc_auc_score(y, p, multi_class="ovr")
        assert got["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro"), abs=1e-12)
        assert got["accuracy"] == pytest.approx(sk.accuracy_score(y, pred), abs=1e-12)
        assert got["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred), abs=1e-12)
        assert got["auroc"] == pytest.approx(auroc, abs=1e-7)


def test_auroc_without_scikit_learn_is_a_number(monkeypatch):
    with_sklearn = [classification_metrics(y, p)["auroc"] for y, p in _metrics_cases()]
    monkeypatch.setitem(sys.modules, "sklearn", None)  # importing sklearn now fails
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)
    with pytest.raises(ImportError):
        import sklearn.metrics  # noqa: F401
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: every class is present
        without = [classification_metrics(y, p)["auroc"] for y, p in _metrics_cases()]
    assert all(np.isfinite(without)) and without == pytest.approx(with_sklearn, abs=1e-12)


def test_undefined_auroc_is_nan_with_a_warning():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    with pytest.warns(RuntimeWarning, match="AUROC is undefined with 1 class"):
        out = classification_metrics([1, 1, 1], p)
    assert np.isnan(out["auroc"]) and out["accuracy"] == pytest.approx(1 / 3)
    # a class without examples: the average over the present classes, with a warning that says so
    rng = np.random.default_rng(1)
    probs = rng.random((30, 3))
    probs /= probs.sum(1, keepdims=True)
    y = np.array([0, 1] * 15)
    with pytest.warns(RuntimeWarning, match=r"class\(es\) \[2\] have no example"):
        out = classification_metrics(y, probs)
    assert np.isfinite(out["auroc"])
    # logits give the same scores as their softmax
    logits = rng.normal(size=(30, 3))
    y3 = np.arange(30) % 3
    soft = torch.softmax(torch.from_numpy(logits), 1).numpy()
    assert classification_metrics(y3, logits) == pytest.approx(classification_metrics(y3, soft))


def test_a_resumed_phase_keeps_its_best_score_and_state(tmp_path):
    """Validation macro-F1 is 1, 1, 0, 0, ... (epoch 1 best). Killed after epoch 3 and resumed to epoch 5, the
    phase must keep epoch 1 as its best: the resumed epochs (score 0) do not replace it, neither in the best file nor
    in the network's final state. Without the continuity, the first resumed epoch would become the best."""

    def run(model, max_epochs, resume):
        optimizer = torch.optim.Adam([model.s], lr=0.1)
        checkpoint = engines.ResumableCheckpoint(
            tmp_path, "phase", {"model": model, "optimizer": optimizer}, resume=resume
        )
        evaluator = engines.phase_evaluator(model, _signed_data())
        trainer = engines.phase_trainer(
            model, _signed_data(), evaluator, optimizer, max_epochs, loss_function=lambda p, y: model.s * 1.0,
            best_path=tmp_path / "best.pt", checkpoint=checkpoint, progress=False,
        )  # fmt: skip
        trainer.run()
        return evaluator

    first = _Signed(0.25)
    run(first, 3, resume=False)
    assert first.s.item() == pytest.approx(0.15, abs=1e-4)  # ends in the state of epoch 1
    resumed = _Signed(0.25)
    evaluator = run(resumed, 5, resume=True)
    assert evaluator.state.epoch == 5 and evaluator.state.best_metric_epoch == 1
    assert resumed.s.item() == pytest.approx(0.15, abs=1e-4)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["s"].item() == pytest.approx(0.15, abs=1e-4)


def test_linear_probe_trains_only_the_head_and_leaves_the_body_and_its_statistics():
    """The probe moves the head's weights and nothing else: not the body's weights, not its norm layers' running
    statistics (the body runs in eval mode); ``requires_grad`` is restored; bad head names are refused."""
    from monai_medmerge.workflows import linear_probe

    torch.manual_seed(0)
    net = build_network(3, RECIPE)
    net.layer1[0].conv1.weight.requires_grad_(False)  # a flag of the caller's, kept as it was
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    history = linear_probe(
        net, HEAD, _loader(shuffle=True), _loader(1), epochs=3, lr=0.05, patience=None, progress=False
    )
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= {"fc.weight", "fc.bias"}, changed
    assert len(history.val) == 3 and history.best_score > 0
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    with pytest.raises(ValueError, match="no module 'classifier' to train as its head"):
        linear_probe(net, "classifier", _loader(), _loader(1), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"head module\(s\) \['act'\] have no parameter"):
        linear_probe(net, ["act"], _loader(), _loader(1), epochs=1, progress=False)
