"""Quick profile of the comparison and of the demo on the real offline brain task (short training: a smoke test
with sanity bounds; the accuracy claims belong to benchmarks/results, not to tests)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml

from medmerge_bench.transfer import COMPARISON_METHODS, Recipe

# the benchmark's network with one or two epochs per phase: a couple of minutes on 2 CPU cores for the pipeline
QUICK = Recipe(source_epochs=1, coef_epochs=2, ft_epochs=2, lp_epochs=1, patience=2)


@pytest.fixture(scope="module")
def brain_available(tmp_path_factory):
    from medmerge_bench.data.tasks import load_benchmark_tasks

    try:
        load_benchmark_tasks("brain", k=10, seed=0, progress=False)
    except (FileNotFoundError, RuntimeError, ImportError) as e:
        pytest.skip(f"brain task data not installed: {e}")
    # one source cache for the module: the demo test reuses the sources the comparison test pretrained
    return tmp_path_factory.mktemp("cache")


def test_quick_comparison_completes_with_sane_metrics(brain_available, tmp_path, monkeypatch):
    from medmerge_bench.comparison import run_comparison

    monkeypatch.setenv("MONAI_MEDMERGE_CACHE", str(brain_available))
    report = run_comparison("brain", 10, [0, 1], tmp_path, recipe=QUICK, progress=False)
    # every method two sources allow (ft_c needs a third)
    assert set(report["summary"]["methods"]) == set(COMPARISON_METHODS) - {"ft_c"}
    for name, table in report["summary"]["methods"].items():
        for key in ("test_macro_f1", "test_accuracy", "test_balanced_accuracy"):
            assert all(0.0 <= v <= 1.0 for v in table[key]["values"]), (name, key)
        auroc = table["test_auroc"]["mean"]
        assert math.isnan(auroc) or 0.0 <= auroc <= 1.0
    # fine-tuning from the anatomy source must learn something even in two epochs: above chance (1/7)
    assert report["summary"]["methods"]["ft_b"]["test_accuracy"]["mean"] > 1 / 7
    paired = report["summary"]["medmerge_ft_vs_best_single_source"]
    assert paired["baseline"] in ("ft_a", "ft_b") and len(paired["differences"]) == 2
    written = json.loads((tmp_path / "brain_k10.json").read_text())
    assert written["machine"]["torch"] == torch.__version__ and written["seeds"] == [0, 1]
    rows = (tmp_path / "brain_k10_per_seed.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * (len(COMPARISON_METHODS) - 1) * 2
    for picture in ("brain_k10_macro_f1.png", "brain_k10_coefficients.png", "brain_k10_curves.png"):
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
    # the second run reuses the cached sources
    again = run_comparison("brain", 10, [0], tmp_path / "again", methods=["ft_a"], recipe=QUICK, progress=False)
    assert all(s["cached"] for s in again["sources"]["sources"].values())


def test_quick_demo_writes_report_and_plain_bundle(brain_available, tmp_path, monkeypatch):
    from medmerge_bench.demo import DEMO_METHODS, DEMO_TASK, MERGED, run_demo
    from medmerge_bench.transfer import METHOD_LABELS

    monkeypatch.setenv("MONAI_MEDMERGE_CACHE", str(brain_available))
    report = run_demo(tmp_path / "demo", recipe=QUICK, progress=False)
    assert report["task"] == DEMO_TASK and report["k"] == 10 and list(report["methods"]) == list(DEMO_METHODS)
    md = (tmp_path / "demo" / "report.md").read_text()
    assert all(f"| {METHOD_LABELS[m]} |" in md for m in DEMO_METHODS)
    # what the rows' names mean, for a reader new to them (the quick recipe distils on mixup blends)
    assert "LP-FT: the source's new target head trained alone first" in md and "mixup blends of the labelled" in md
    # beside the table, what its numbers mean: one seed, the room, and the recorded benchmark or where to run one
    assert "Reading it (one seed, no spread" in md and "docs/benchmarks.md" in md
    assert "- The room: the ensemble of the two fine-tuned sources" in md
    assert "Recorded over" in md or "No recorded benchmark" in md
    # the same recipe in the training bundle
    assert "python -m monai.bundle run paper --config_file configs/train.yaml --recipe paper" in md
    # the merge's coefficients are drawn although no direct merge ran: the LP-FT pair's merge, anchored on the LP-FT
    # network that validated best
    table = report["summary"]["methods"]
    best = max("ab", key=lambda t: (table[f"lpft_{t}"]["val_macro_f1"]["mean"], t == "a"))
    assert report["per_seed"][0]["anchor"] == best and report["coefficients_seed0"]
    for picture in ("results_macro_f1.png", "results_coefficients.png", "results_curves.png"):
        assert f"![{picture}]({picture})" in md and (tmp_path / "demo" / picture).is_file()
    bundle = tmp_path / "demo" / "bundle"
    inference = yaml.safe_load((bundle / "configs" / "inference.yaml").read_text())
    assert inference["network_def"]["_target_"] == "monai.networks.nets.ResNet"
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert state["fc.weight"].shape[0] == len(report["data"]["target"]["classes"]) == 13
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["medmerge"]["recipe"] == "paper"
    # the exported weights are the merged network's: they score its row's test macro-F1 on the target's test patches
    from sklearn.metrics import f1_score

    from medmerge_bench.data.tasks import load_benchmark_tasks
    from medmerge_bench.transfer import build_network

    test = load_benchmark_tasks(DEMO_TASK, k=10, seed=0, progress=False).target.test.tensors
    net = build_network(13, QUICK)
    net.load_state_dict(state)
    with torch.no_grad():
        predicted = net.eval()(test[0]).argmax(1)
    exported = f1_score(test[1].numpy(), predicted.numpy(), average="macro")
    assert exported == pytest.approx(report["summary"]["methods"][MERGED]["test_macro_f1"]["mean"], abs=1e-6)


def test_zip_row_records_metrics_and_cost_beside_the_ensemble():
    """``paper_zip(_ft)`` on a tiny random task: the zipped pair at the recipe's width, with its MACs."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from medmerge_bench.transfer import build_network, run_seed
    from monai_medmerge.cli import _with_settings

    recipe = _with_settings(Recipe(widths=(4, 8, 8, 16), ft_epochs=1, patience=1), ["zip_width=1.5"])
    assert recipe.zip_widths() == (6, 12, 12, 24)
    with pytest.raises(ValueError, match=r"zip_width must lie in \[1, 2\]"):
        Recipe(zip_width=2.5)
    g = torch.Generator().manual_seed(0)

    def split(n):
        return TensorDataset(torch.randn(n, 1, 32, 32, generator=g), torch.arange(n) % 3)

    tasks = SimpleNamespace(target=SimpleNamespace(num_classes=3, train=split(12), val=split(9), test=split(9)))
    sources = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        sources.append(build_network(5, recipe).eval())
    result = run_seed(
        tasks, sources, recipe, 0, ["ft_a", "ft_b", "paper_zip", "paper_zip_ft", "ensemble"], progress=False
    )
    rec = result.records["paper_zip_ft"]
    assert rec["widths"] == [6, 12, 12, 24] and rec["zip_width"] == 1.5 and 0.0 <= rec["test"]["macro_f1"] <= 1.0
    assert rec["merged_features"] == sum(w // 2 for w in (4, 4, 8, 8, 8, 8, 16, 16))  # conv1 group and 7 more
    assert (
        rec["inference_macs_ensemble"] == result.records["ensemble"]["inference_macs"] == 2 * rec["inference_macs_1x"]
    )
    assert 2.0 * rec["inference_macs_1x"] < rec["inference_macs"] < 2.3 * rec["inference_macs_1x"]
    assert result.records["paper_zip"]["widths"] == rec["widths"] and "curve" not in result.records["paper_zip"]


def test_every_training_loop_runs_on_the_recipes_device(monkeypatch):
    """``Recipe.device`` reaches every training loop of the sources' pretraining and of every method (here
    ``"cpu:0"``, a device string no default spells, so a loop left on its default is caught), and the
    sources come back on the CPU."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from medmerge_bench import transfer
    from medmerge_bench.transfer import pretrain_sources, run_seed

    recipe = Recipe(
        widths=(4, 8, 8, 16), source_epochs=1, coef_epochs=1, ft_epochs=1, lp_epochs=1, patience=1, device="cpu:0"
    )
    with pytest.raises(ValueError, match="device must be a torch device such as 'cpu' or 'cuda', got 'gpu0'"):
        Recipe(device="gpu0")
    seen = []
    for name in ("fit", "fine_tune", "linear_probe", "learn_coefficients"):
        real = getattr(transfer, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs.get("device")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(transfer, name, spy)
    g = torch.Generator().manual_seed(0)

    def task(n, classes=3, name="t"):
        def split(m):
            return TensorDataset(torch.randn(m, 1, 32, 32, generator=g), torch.arange(m) % classes)

        return SimpleNamespace(name=name, num_classes=classes, train=split(n), val=split(9), test=split(9))

    tasks = SimpleNamespace(name="tiny", source_a=task(10, 5, "a"), source_b=task(10, 5, "b"), target=task(12))
    sources, _ = pretrain_sources(tasks, recipe, cache=False, progress=False)
    assert all(p.device.type == "cpu" for s in sources for p in s.parameters())
    methods = [m for m in COMPARISON_METHODS if m != "ft_c"]
    result = run_seed(tasks, sources, recipe, 0, methods, progress=False)
    assert set(result.records) == set(methods)
    assert {name for name, _ in seen} == {"fit", "fine_tune", "linear_probe", "learn_coefficients"}
    assert [s for s in seen if s[1] != "cpu:0"] == []


def test_three_sources_are_fine_tuned_ensembled_and_merged_together(monkeypatch):
    """N = 3 (A, B and their ancestor): ``ft_c`` is the third source's fine-tuning, the ensemble averages all three
    fine-tuned networks, the paper's MedMerge merges the three, and the best single source is chosen among three."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    import medmerge_bench.transfer as transfer
    from medmerge_bench.transfer import build_network, run_seed, summarize
    from monai_medmerge.workflows.metrics import classification_metrics

    recipe = Recipe(widths=(4, 8, 8, 16), ft_epochs=1, coef_epochs=1, patience=1)
    with pytest.raises(ValueError, match="needs lineage='shared'"):
        Recipe(pair="ab_ancestor")
    g = torch.Generator().manual_seed(0)

    def split(n):
        return TensorDataset(torch.randn(n, 1, 32, 32, generator=g), torch.arange(n) % 3)

    tasks = SimpleNamespace(target=SimpleNamespace(num_classes=3, train=split(12), val=split(9), test=split(9)))
    sources = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        sources.append(build_network(5, recipe).eval())
    merged_sources = []
    real_merge = transfer.KernelMerge

    def spy(pool, *args, **kwargs):
        merged_sources.append(len(pool))
        return real_merge(pool, *args, **kwargs)

    monkeypatch.setattr(transfer, "KernelMerge", spy)
    probs = {}
    real_record = transfer.record

    def keep(model, val, test, history=None):
        rec = real_record(model, val, test, history)
        probs[len(probs)] = rec["_probs"][1]
        return rec

    monkeypatch.setattr(transfer, "record", keep)
    methods = ["ft_a", "ft_b", "ft_c", "paper_medmerge_ft", "ensemble"]
    result = run_seed(tasks, sources, recipe, 0, methods, progress=False)
    assert set(result.records) == set(methods)
    assert merged_sources == [3]  # the paper's MedMerge merged the three fine-tuned networks
    expected = classification_metrics(tasks.target.test.tensors[1].numpy(), (probs[0] + probs[1] + probs[2]) / 3)
    assert result.records["ensemble"]["test"] == pytest.approx(expected)
    assert result.records["ensemble"]["inference_cost"].startswith("3 networks")
    summary = summarize([result])
    singles = {m: result.records[m]["val"]["macro_f1"] for m in ("ft_a", "ft_b", "ft_c")}
    assert summary["best_single_source"] == max(singles, key=singles.get)
    assert set(summary["vs_best_single_source"]) == {"paper_medmerge_ft"}
    with pytest.raises(ValueError, match="ft_c needs a third source"):
        run_seed(tasks, sources[:2], recipe, 0, ["ft_c"], progress=False)


def test_distillation_on_unlabelled_images_draws_from_the_pool_not_the_batch():
    """``distill_unlabeled=n``: the KL term's inputs are drawn from the first n unlabelled images of the target, the
    teachers see exactly those, and a task without enough of them is an error naming the setting."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from medmerge_bench.transfer import build_network, distill_images, run_seed
    from monai_medmerge.workflows.distillation import EnsembleDistillation

    g = torch.Generator().manual_seed(0)
    pool = torch.randn(20, 1, 32, 32, generator=g)
    seen = []

    class Teacher(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(len(x), 3)

    distillation = EnsembleDistillation([Teacher()], 1.0, pool[:8], seed=0)
    batch = torch.randn(4, 1, 32, 32, generator=g)
    inputs, label = distillation.prepare_batch((batch, torch.tensor([0, 1, 2, 0])))
    assert inputs.shape == (8, 1, 32, 32) and torch.equal(inputs[:4], batch) and seen[0].shape == (4, 1, 32, 32)
    # every distilled input is one of the first 8 pool images, none is a batch image or a blend of them
    assert all(any(torch.equal(x, p) for p in pool[:8]) for x in seen[0])
    assert torch.equal(inputs[4:], seen[0])
    loss = distillation.loss(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 3))(inputs), label)
    assert torch.isfinite(loss) and loss > 0

    def split(n):
        return TensorDataset(torch.randn(n, 1, 32, 32, generator=g), torch.arange(n) % 3)

    target = SimpleNamespace(name="tiny", num_classes=3, train=split(12), val=split(9), test=split(9), unlabeled=pool)
    recipe = Recipe(widths=(4, 8, 8, 16), ft_epochs=1, coef_epochs=1, patience=1, distill_unlabeled=16)
    assert torch.equal(distill_images(target, recipe), pool[:16])
    with pytest.raises(ValueError, match="distill_unlabeled must be >= 0"):
        Recipe(distill_unlabeled=-1)
    with pytest.raises(ValueError, match=r"distill_unlabeled=32 needs that many unlabelled images of task 'tiny'"):
        distill_images(target, Recipe(distill_unlabeled=32))
    sources = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        sources.append(build_network(5, recipe).eval())
    methods = ["ft_a", "ft_b", "paper_medmerge_distill", "ft_steps"]
    result = run_seed(SimpleNamespace(target=target), sources, recipe, 0, methods, progress=False)
    assert 0.0 <= result.records["paper_medmerge_distill"]["test"]["macro_f1"] <= 1.0


def test_distill_steps_lengthen_the_epochs_of_the_distillation_rows_and_their_control(monkeypatch):
    """``distill_steps``: the distillation rows and ``ft_steps`` train that many batches per epoch, every labelled
    image once per pass; the other fine-tunings keep one pass."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    import medmerge_bench.transfer as transfer
    from medmerge_bench.transfer import build_network, run_seed, with_steps

    data = TensorDataset(torch.arange(10.0), torch.zeros(10))
    plain = DataLoader(data, batch_size=4)
    assert with_steps(plain, 0, 0) is plain
    longer = with_steps(plain, 5, 0)
    batches = [x for x, _ in longer]
    assert len(longer) == len(batches) == 5 and all(len(b) == 4 for b in batches)
    first_pass = torch.cat(batches)[:10]
    assert sorted(first_pass.tolist()) == list(range(10))  # a reshuffled pass, then the next
    with pytest.raises(ValueError, match="distill_steps must be >= 0"):
        Recipe(distill_steps=-1)

    g = torch.Generator().manual_seed(0)

    def split(n):
        return TensorDataset(torch.randn(n, 1, 32, 32, generator=g), torch.arange(n) % 3)

    target = SimpleNamespace(name="tiny", num_classes=3, train=split(12), val=split(9), test=split(9))
    recipe = Recipe(widths=(4, 8, 8, 16), batch_size=4, ft_epochs=1, coef_epochs=1, patience=1, distill_steps=7)
    steps = {}
    real = transfer.fine_tune

    def spy(net, train, *args, desc="", **kwargs):
        steps[desc] = len(train)
        return real(net, train, *args, desc=desc, **kwargs)

    monkeypatch.setattr(transfer, "fine_tune", spy)
    sources = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        sources.append(build_network(5, recipe).eval())
    methods = ["ft_a", "ft_b", "paper_medmerge_ft", "paper_medmerge_distill", "ft_distill", "ft_steps"]
    run_seed(SimpleNamespace(target=target), sources, recipe, 0, methods, progress=False)
    labels = transfer.METHOD_LABELS
    assert steps[labels["ft_a"]] == steps[labels["ft_b"]] == 3  # 12 images, batches of 4
    assert steps[labels["ft_steps"]] == steps[labels["ft_distill"]] == 7
    phase2 = {d: n for d, n in steps.items() if d.startswith("phase 2")}
    assert phase2 == {
        f"phase 2: fine-tune ({labels['paper_medmerge_ft']})": 3,
        f"phase 2: fine-tune ({labels['paper_medmerge_distill']})": 7,
    }


def _spied_tiny_run(monkeypatch):
    """A three-class toy target, a small recipe and two random sources; ``fine_tune`` records, per description,
    the state each fine-tuning started from (``starts``) and ended with (``ends``)."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    import medmerge_bench.transfer as transfer
    from medmerge_bench.transfer import build_network

    g = torch.Generator().manual_seed(0)

    def split(n):
        return TensorDataset(torch.randn(n, 1, 32, 32, generator=g), torch.arange(n) % 3)

    target = SimpleNamespace(name="tiny", num_classes=3, train=split(12), val=split(9), test=split(9))
    recipe = Recipe(widths=(4, 8, 8, 16), batch_size=4, ft_epochs=2, coef_epochs=1, patience=2)
    starts, ends = {}, {}
    real = transfer.fine_tune

    def spy(net, train, *args, desc="", **kwargs):
        starts[desc] = {k: v.clone() for k, v in net.state_dict().items()}
        tuned, hist = real(net, train, *args, desc=desc, **kwargs)
        ends[desc] = {k: v.clone() for k, v in tuned.state_dict().items()}
        return tuned, hist

    monkeypatch.setattr(transfer, "fine_tune", spy)
    sources = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        sources.append(build_network(5, recipe).eval())
    return target, recipe, sources, starts, ends


def test_ft_longer_fine_tunes_the_anchors_fine_tuned_network_again(monkeypatch):
    """The paper recipe's equal-budget control starts where the anchor's fine-tuning ended (not from the source),
    leaves that network as it was, and the summary pairs the paper's recipe against it seed by seed."""
    from types import SimpleNamespace

    import medmerge_bench.transfer as transfer
    from medmerge_bench.transfer import run_seed, summarize

    target, recipe, sources, starts, ends = _spied_tiny_run(monkeypatch)
    methods = ["ft_a", "ft_b", "lpft_a", "lpft_b", "medmerge_ft", "paper_medmerge_ft", "ft_longer", "ensemble"]
    results = [run_seed(SimpleNamespace(target=target), sources, recipe, s, methods, progress=False) for s in (0, 1)]
    labels = transfer.METHOD_LABELS
    anchor = labels[f"ft_{'ab'[results[-1].anchor]}"]
    assert starts[labels["ft_longer"]].keys() == ends[anchor].keys()
    for key, value in ends[anchor].items():
        torch.testing.assert_close(starts[labels["ft_longer"]][key], value, rtol=0, atol=0)
    assert any(not torch.equal(ends[labels["ft_longer"]][k], v) for k, v in ends[anchor].items())  # it trained
    summary = summarize(results)
    control = summary["paper_medmerge_ft_vs_ft_longer"]
    expected = [
        r.records["paper_medmerge_ft"]["test"]["macro_f1"] - r.records["ft_longer"]["test"]["macro_f1"] for r in results
    ]
    assert control["baseline"] == "ft_longer" and control["differences"] == pytest.approx(expected)
    # the direct recipe against LP-FT of the better source, its head-first schedule without a merge
    lpft = "lp" + summary["best_single_source"]
    direct = summary["medmerge_ft_vs_lpft"]
    expected = [r.records["medmerge_ft"]["test"]["macro_f1"] - r.records[lpft]["test"]["macro_f1"] for r in results]
    assert direct["baseline"] == lpft and direct["differences"] == pytest.approx(expected)


def test_the_paper_pairs_merges_are_also_recorded_before_their_last_fine_tuning(monkeypatch):
    """``paper_average`` (a soup: the fine-tuned pair's mean weights, norm statistics recomputed) and
    ``paper_medmerge`` (phase 1 collapsed) are the networks their ``*_ft`` rows then fine-tune; asked alone, they are
    not fine-tuned at all."""
    from types import SimpleNamespace

    import medmerge_bench.transfer as transfer
    from medmerge_bench.transfer import build_network, record, run_seed

    target, recipe, sources, starts, ends = _spied_tiny_run(monkeypatch)
    labels = transfer.METHOD_LABELS
    methods = ["ft_a", "ft_b", "paper_average", "paper_average_ft", "paper_medmerge", "paper_medmerge_ft"]
    recs = run_seed(SimpleNamespace(target=target), sources, recipe, 0, methods, progress=False).records
    val, test = (transfer.loader(d, False, 0, 256) for d in (target.val, target.test))
    for name, desc in (
        ("paper_average", labels["paper_average_ft"]),
        ("paper_medmerge", f"phase 2: fine-tune ({labels['paper_medmerge_ft']})"),
    ):
        net = build_network(3, recipe)
        net.load_state_dict(starts[desc])
        assert record(net.eval(), val, test)["test"] == recs[name]["test"]
    soup, ft_a, ft_b = starts[labels["paper_average_ft"]], ends[labels["ft_a"]], ends[labels["ft_b"]]
    torch.testing.assert_close(soup["conv1.weight"], (ft_a["conv1.weight"] + ft_b["conv1.weight"]) / 2)
    # asked alone, neither is fine-tuned
    starts.clear()
    recs = run_seed(
        SimpleNamespace(target=target), sources, recipe, 0, ["ft_a", "ft_b", "paper_average", "paper_medmerge"], False
    ).records
    assert {"paper_average", "paper_medmerge"} <= set(recs) and set(starts) == {labels["ft_a"], labels["ft_b"]}


def test_ensemble_lpft_averages_the_head_first_fine_tunings_and_records_their_room(monkeypatch):
    """``ensemble_lpft`` is the mean probability of the LP-FT networks of every source (run for it even when their
    rows are not asked for, and then not reported), and ``room_head_first`` pairs it against the LP-FT row that
    validates best, seed by seed."""
    from types import SimpleNamespace

    import numpy as np

    import medmerge_bench.transfer as transfer
    from medmerge_bench.transfer import run_seed, summarize
    from monai_medmerge.workflows.metrics import classification_metrics

    target, recipe, sources, _, _ = _spied_tiny_run(monkeypatch)
    spied_fine_tune, real_record = transfer.fine_tune, transfer.record
    nets, probs = {}, {}

    def fine_tune(net, train, *args, desc="", **kwargs):
        tuned, hist = spied_fine_tune(net, train, *args, desc=desc, **kwargs)
        nets[desc] = tuned
        return tuned, hist

    def record(model, *args, **kwargs):
        rec = real_record(model, *args, **kwargs)
        probs[id(model)] = rec["_probs"]
        return rec

    monkeypatch.setattr(transfer, "fine_tune", fine_tune)
    monkeypatch.setattr(transfer, "record", record)
    labels = transfer.METHOD_LABELS
    methods = ["ft_a", "ft_b", "lpft_a", "lpft_b", "ensemble", "ensemble_lpft"]
    results = []
    for seed in (0, 1):
        res = run_seed(SimpleNamespace(target=target), sources, recipe, seed, methods, progress=False)
        members = [probs[id(nets[labels[f"lpft_{t}"]])][1] for t in "ab"]
        expected = classification_metrics(target.test.tensors[1].numpy(), np.mean(members, axis=0))
        assert res.records["ensemble_lpft"]["test"] == pytest.approx(expected)
        results.append(res)
    summary = summarize(results)
    best = summary["best_single_source_head_first"]
    val = {m: np.mean([r.records[m]["val"]["macro_f1"] for r in results]) for m in ("lpft_a", "lpft_b")}
    assert best == max(val, key=val.get)
    expected = [r.records["ensemble_lpft"]["test"]["macro_f1"] - r.records[best]["test"]["macro_f1"] for r in results]
    assert summary["room_head_first"]["differences"] == pytest.approx(expected)
    assert "ensemble_lpft" not in summary["vs_best_single_source"]  # two networks: not a one-network method
    # asked alone, the LP-FT networks are still trained, and the same (identically seeded), but not reported
    alone = run_seed(SimpleNamespace(target=target), sources, recipe, 1, ["ensemble_lpft"], progress=False)
    assert set(alone.records) == {"ensemble_lpft"}
    assert alone.records["ensemble_lpft"]["test"] == pytest.approx(results[1].records["ensemble_lpft"]["test"])


def test_paper_recipe_head_first_merges_the_lpft_networks_anchored_on_the_best_validated(monkeypatch):
    """``paper_lpft_medmerge_ft`` merges exactly the LP-FT networks (their target heads included), anchored on the
    one with the higher validation macro-F1, and is paired against the better LP-FT row in the summary."""
    from types import SimpleNamespace

    import numpy as np

    import medmerge_bench.transfer as transfer
    from medmerge_bench.transfer import run_seed, summarize

    target, recipe, sources, _, _ = _spied_tiny_run(monkeypatch)
    spied_fine_tune, real_merge = transfer.fine_tune, transfer.KernelMerge
    nets, merges = {}, []

    def fine_tune(net, train, *args, desc="", **kwargs):
        tuned, hist = spied_fine_tune(net, train, *args, desc=desc, **kwargs)
        nets[desc] = tuned
        return tuned, hist

    def kernel_merge(pool, **kwargs):
        merges.append((list(pool), kwargs["anchor"]))
        return real_merge(pool, **kwargs)

    monkeypatch.setattr(transfer, "fine_tune", fine_tune)
    monkeypatch.setattr(transfer, "KernelMerge", kernel_merge)
    labels = transfer.METHOD_LABELS
    results = []
    for seed in (0, 1):
        merges.clear()
        res = run_seed(SimpleNamespace(target=target), sources, recipe, seed, ["paper_lpft_medmerge_ft"], False)
        (pool, _), *others = merges
        assert not others and set(res.records) == {"paper_lpft_medmerge_ft"}
        assert [id(n) for n in pool] == [id(nets[labels[f"lpft_{t}"]]) for t in "ab"]
        results.append(res)
    # the anchor is the LP-FT network that validates best: with both rows recorded, it is checkable
    merges.clear()
    res = run_seed(
        SimpleNamespace(target=target),
        sources,
        recipe,
        0,
        ["ft_a", "ft_b", "lpft_a", "lpft_b", "paper_lpft_medmerge_ft"],
        False,
    )
    val = [res.records[f"lpft_{t}"]["val"]["macro_f1"] for t in "ab"]
    assert val[0] != val[1] and merges[-1][1] == int(np.argmax(val))
    summary = summarize([res, res])
    assert "paper_lpft_medmerge_ft" in summary["vs_best_single_source"]


def test_the_lpft_distillation_rows_start_from_the_probed_anchor_and_learn_from_the_lpft_pair(monkeypatch):
    """``lpft_distill`` and ``lpft_steps`` fine-tune the anchor's network as it was after its linear probe (not the
    fine-tuned one), for ``distill_steps`` per epoch; the distilled rows' teachers are the LP-FT networks; the summary
    pairs both distilled rows against ``lpft_steps``."""
    from types import SimpleNamespace

    import medmerge_bench.transfer as transfer
    from medmerge_bench.transfer import run_seed, summarize

    target, recipe, sources, starts, ends = _spied_tiny_run(monkeypatch)
    g = torch.Generator().manual_seed(3)
    target.unlabeled = torch.randn(20, 1, 32, 32, generator=g)
    recipe = dataclasses.replace(recipe, distill_unlabeled=20, distill_steps=5)
    spied_fine_tune, real_distilled = transfer.fine_tune, transfer.EnsembleDistillation
    nets, teachers, steps = {}, [], {}

    def fine_tune(net, train, *args, desc="", **kwargs):
        steps[desc] = len(train)
        tuned, hist = spied_fine_tune(net, train, *args, desc=desc, **kwargs)
        nets[desc] = tuned
        return tuned, hist

    def distilled(pool, *args, **kwargs):
        teachers.append(list(pool))
        return real_distilled(pool, *args, **kwargs)

    monkeypatch.setattr(transfer, "fine_tune", fine_tune)
    monkeypatch.setattr(transfer, "EnsembleDistillation", distilled)
    labels = transfer.METHOD_LABELS
    methods = ["lpft_a", "lpft_b", "lpft_distill", "lpft_steps", "paper_lpft_medmerge_distill"]
    results = [run_seed(SimpleNamespace(target=target), sources, recipe, s, methods, progress=False) for s in (0, 1)]
    res = results[-1]
    anchor = "ab"[int(res.records["lpft_b"]["val"]["macro_f1"] > res.records["lpft_a"]["val"]["macro_f1"])]
    lpft = [nets[labels[f"lpft_{t}"]] for t in "ab"]
    assert len(teachers) == 4 and all([id(n) for n in pool] == [id(n) for n in lpft] for pool in teachers[2:])
    probed_start, tuned_end = starts[labels["lpft_steps"]], ends[labels[f"lpft_{anchor}"]]
    lp_start = starts[labels[f"lpft_{anchor}"]]  # the fine-tuning of the LP-FT row starts from the probed network
    for key, value in lp_start.items():
        torch.testing.assert_close(probed_start[key], value, rtol=0, atol=0)
    assert any(not torch.equal(probed_start[k], v) for k, v in tuned_end.items())  # not the fine-tuned network
    assert steps[labels["lpft_steps"]] == 5 and steps[labels[f"lpft_{anchor}"]] == 3
    summary = summarize(results)
    for name in ("lpft_distill", "paper_lpft_medmerge_distill"):
        expected = [r.records[name]["test"]["macro_f1"] - r.records["lpft_steps"]["test"]["macro_f1"] for r in results]
        assert summary[f"{name}_vs_lpft_steps"]["differences"] == pytest.approx(expected)
