"""The two recipes: phase 0 of the paper recipe through the Python API and the training bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from torch.utils.data import DataLoader, TensorDataset

from monai_medmerge.bundle.example import example_network_def
from monai_medmerge.sources import load_checkpoint
from monai_medmerge.workflows import engines, fine_tune_sources, phase1_network, phase1_sources

pytest.importorskip("ignite")

WIDTHS = (4, 8, 8, 8)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from bundle_utils import bundle_copy, overrides, run_bundle  # noqa: E402


def _network(num_classes: int) -> torch.nn.Module:
    return ConfigParser({"n": example_network_def(num_classes, WIDTHS)}).get_parsed_content("n")


def _loader(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(48) % 3
    x = torch.randn(48, 1, 16, 16, generator=g) + y.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))


def _sources() -> list[torch.nn.Module]:
    nets = []
    for seed, classes in ((1, 5), (2, 7)):
        torch.manual_seed(seed)
        nets.append(_network(classes).eval())
    return nets


def _sources_like(state: dict, num_classes: int) -> list[torch.nn.Module]:
    """Two networks of the example bundle's architecture (the widths of ``state``) for a direct merge to compare."""
    from bundle_utils import WIDTHS as BUNDLE_WIDTHS

    net = ConfigParser({"n": example_network_def(num_classes, BUNDLE_WIDTHS)}).get_parsed_content("n")
    net.load_state_dict(state)
    return [net, net]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_phase0_fine_tunes_a_copy_of_each_source_with_a_new_head(tmp_path):
    sources = _sources()
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in sources]
    torch.manual_seed(0)
    tuned = fine_tune_sources(
        sources, "fc", 3, _loader(), _loader(1), epochs=2, patience=None, ckpt_dir=tmp_path, progress=False
    )
    assert len(tuned) == 2
    for i, (source, net) in enumerate(zip(sources, tuned, strict=True)):
        assert _same(source.state_dict(), before[i])  # the sources are left as they were
        assert net.fc.out_features == 3
        changed = [
            k for k, v in net.state_dict().items() if not k.startswith("fc.") and not torch.equal(v, before[i][k])
        ]
        assert any(k.endswith("conv1.weight") for k in changed)  # the body was trained, not only the head
        best, marker = tmp_path / f"phase0_source{i}.pt", tmp_path / f"phase0_source{i}.done"
        assert marker.is_file() and json.loads(marker.read_text())["epochs"] == 2
        assert _same(load_checkpoint(best), net.state_dict())  # the network ends in its best state, the one saved
    # resuming a completed phase 0 loads each best state instead of training again
    again = fine_tune_sources(
        sources, "fc", 3, _loader(), _loader(1), epochs=2, ckpt_dir=tmp_path, resume=True, progress=False
    )
    assert all(_same(a.state_dict(), b.state_dict()) for a, b in zip(again, tuned, strict=True))
    # phase 1 of the paper recipe merges exactly those networks
    merged_from = phase1_sources("paper", sources, "fc", 3, tmp_path)
    assert all(_same(a.state_dict(), b.state_dict()) for a, b in zip(merged_from, tuned, strict=True))
    assert phase1_sources("direct", sources, "fc", 3, tmp_path) == sources
    assert fine_tune_sources(sources, "fc", 3, _loader(), _loader(1), recipe="direct") == sources


def test_paper_merge_keeps_the_fine_tuned_heads(tmp_path):
    sources = _sources()
    tuned = fine_tune_sources(sources, "fc", 3, _loader(), _loader(1), epochs=1, patience=None, progress=False)
    merge = phase1_network(tuned, "fc", 3, anchor=0, anchor_weight=1.0 - 1e-6, merge_heads=True)
    x = torch.randn(4, 1, 16, 16)
    # with the anchor's share at ~1 the merge is source 0's fine-tuned network, its trained head included
    merge.eval()
    torch.testing.assert_close(merge.collapse().eval()(x), tuned[0](x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="must have 3 outputs"):
        phase1_network(sources, "fc", 3, merge_heads=True)


def test_phase1_of_the_paper_recipe_needs_phase0(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"phase0_source0\.done is missing\): run phase 0 first"):
        phase1_sources("paper", _sources(), "fc", 3, tmp_path)
    with pytest.raises(ValueError, match="recipe must be one of direct, paper"):
        phase1_sources("papr", _sources(), "fc", 3, tmp_path)


def test_bundle_paper_recipe_runs_phase0_then_the_merge(example_workspace, tmp_path):
    example = example_workspace
    root = bundle_copy(tmp_path / "bundle")
    args = overrides(example, root, recipe="paper", phase0_epochs="2")
    proc = run_bundle(root, ["train.yaml"], args, run_id="phase1")
    assert proc.returncode != 0 and "phase 0 has not completed for source 0" in proc.stdout
    proc = run_bundle(root, ["train.yaml"], args, run_id="phase0")
    assert proc.returncode == 0, proc.stdout[-4000:]
    models = root / "models"
    for i in range(2):
        assert (models / f"phase0_source{i}.done").is_file()
        state = load_checkpoint(models / f"phase0_source{i}.pt")
        assert state["fc.weight"].shape[0] == len(example["class_names"])
    assert not (models / "phase1_best.pt").exists()
    stamps = [(models / f"phase0_source{i}.done").stat().st_mtime_ns for i in range(2)]
    proc = run_bundle(root, ["train.yaml"], args)  # `run` is phases 1 and 2: it reads phase 0's networks
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert (models / "model.pt").is_file()
    proc = run_bundle(root, ["train.yaml"], args, run_id="paper")  # a fresh whole run: phase 0 again, then 1 and 2
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert all((models / f"phase0_source{i}.done").stat().st_mtime_ns > stamps[i] for i in range(2))
    assert _same(load_checkpoint(models / "phase0_source1.pt"), state)  # phase 0 is the same at the same seed
    assert (models / "model.pt").is_file() and (models / "phase1_best.pt").is_file()
    # the heads were merged: a new head would be a trainable `network.fc.*` of the merge; merged, the head is one
    # more merge unit (3 more coefficients per source, one per class)
    phase1 = load_checkpoint(models / "phase1_best.pt")
    assert "network.fc.weight" not in phase1
    direct_merge = phase1_network(_sources_like(state, len(example["class_names"])), "fc", len(example["class_names"]))
    assert phase1["merge_logits"].shape[1] == direct_merge.merge_logits.shape[1] + len(example["class_names"])
    # the recipe is part of the run's fingerprint: resuming it as a direct run is refused
    direct = overrides(example, root, recipe="direct", phase0_epochs="2", resume="True")
    proc = run_bundle(root, ["train.yaml"], direct)
    assert proc.returncode != 0 and "resume continues only that run" in proc.stdout
    assert engines.RUN_FILE == "run.json"
    # phase0_head_epochs reaches phase 0: the same seed with each new head trained first ends elsewhere
    head_first = overrides(example, root, recipe="paper", phase0_epochs="2", phase0_head_epochs="1")
    proc = run_bundle(root, ["train.yaml"], head_first, run_id="phase0")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert not _same(load_checkpoint(models / "phase0_source1.pt"), state)


def test_phase0_head_first_trains_each_new_head_before_the_fine_tuning(tmp_path, monkeypatch):
    """With ``head_epochs`` each source's new head is probed on the frozen source, and the fine-tuning starts from
    exactly that head; resuming a fine-tuning that has a checkpoint does not probe again; bad values are refused."""
    import monai_medmerge.workflows.recipes as recipes

    probed, started = [], []
    real_probe, real_trainer = recipes.linear_probe, recipes.engines.phase_trainer

    def probe(net, heads, *args, **kwargs):
        history = real_probe(net, heads, *args, **kwargs)
        probed.append((heads, kwargs["epochs"], net.fc.weight.detach().clone()))
        return history

    def trainer(network, *args, **kwargs):
        if isinstance(network, type(sources[0])):  # the fine-tunings, not the probes (which wrap the network)
            started.append(network.fc.weight.detach().clone())
        return real_trainer(network, *args, **kwargs)

    monkeypatch.setattr(recipes, "linear_probe", probe)
    monkeypatch.setattr(recipes.engines, "phase_trainer", trainer)
    sources = _sources()
    torch.manual_seed(0)
    fine_tune_sources(
        sources,
        "fc",
        3,
        _loader(),
        _loader(1),
        epochs=1,
        patience=None,
        ckpt_dir=tmp_path,
        progress=False,
        head_epochs=2,
    )
    assert [(heads, epochs) for heads, epochs, _ in probed] == [(["fc"], 2), (["fc"], 2)]
    for (_, _, head), start in zip(probed, started, strict=True):
        torch.testing.assert_close(start, head, rtol=0, atol=0)
    # a resumed fine-tuning (a periodic checkpoint of each source, no completion marker) is not probed again
    for i in range(2):
        (tmp_path / f"phase0_source{i}.done").unlink()
    probed.clear()
    fine_tune_sources(
        sources,
        "fc",
        3,
        _loader(),
        _loader(1),
        epochs=2,
        patience=None,
        ckpt_dir=tmp_path,
        resume=True,
        progress=False,
        head_epochs=2,
    )
    assert probed == []
    with pytest.raises(ValueError, match="head_epochs must be >= 0"):
        fine_tune_sources(sources, "fc", 3, _loader(), _loader(1), head_epochs=-1, progress=False)
