"""Tests for monai_medmerge.sources: compatibility checks, safe checkpoint loading, bundles and atomic saving."""

from __future__ import annotations

import copy
import functools
import json
import os
import pathlib
import pickle
import re

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import yaml
from monai.bundle import ConfigParser
from monai.networks.nets import NetAdapter, resnet18

from monai_medmerge.safe_config import build_network_def, read_network_def
from monai_medmerge.sources import (
    UntrustedConfigError,
    check_compatible,
    load_checkpoint,
    load_source,
    save_checkpoint,
    state_dict_diff,
)
from monai_medmerge.workflows.engines import load_sources

RESNET_CONFIG = {"_target_": "monai.networks.nets.resnet18", "spatial_dims": 2, "n_input_channels": 1, "num_classes": 3}


class TinyConvNet(nn.Module):
    """A small CNN whose ``n_extra`` flag adds layers, giving one class with different state-dict keys."""

    def __init__(self, n_extra: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        if n_extra:
            self.extra = nn.Sequential(*[nn.Conv2d(4, 4, 1) for _ in range(n_extra)])
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        if hasattr(self, "extra"):
            x = self.extra(x)
        return self.head(x.mean(dim=(2, 3)))


class TouchOnUnpickle:
    """Unpickling this object creates the file ``marker``: a stand-in for a checkpoint that runs code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _resnet(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return resnet18(spatial_dims=2, n_input_channels=1, num_classes=num_classes)


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    # safetensors files store keys sorted, so only the set of keys is compared.
    assert sorted(actual) == sorted(expected)
    for k, v in expected.items():
        assert actual[k].shape == v.shape, k
        assert torch.equal(actual[k], v), k


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# check_compatible


def test_compatible_sources_pass():
    assert check_compatible([_resnet(seed=0), _resnet(seed=1)]) is None
    assert check_compatible([TinyConvNet(), TinyConvNet(), TinyConvNet()]) is None


def test_fewer_than_two_sources():
    with pytest.raises(ValueError, match="need at least 2 sources, got 1"):
        check_compatible([_resnet()])
    with pytest.raises(ValueError, match="need at least 2 sources, got 0"):
        check_compatible([])


def test_source_not_a_module():
    with pytest.raises(ValueError, match=r"source 1 is not a torch\.nn\.Module, got builtins\.dict"):
        check_compatible([TinyConvNet(), dict(TinyConvNet().state_dict())])


def test_different_classes():
    expected = f"source 1 is {_class_name(TinyConvNet)}, source 0 is monai.networks.nets.resnet.ResNet"
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_compatible([_resnet(), TinyConvNet()])


def test_extra_and_missing_keys():
    torch.manual_seed(0)
    plain, extended = TinyConvNet(), TinyConvNet(n_extra=1)
    with pytest.raises(
        ValueError, match=re.escape("source 1 has 2 key(s) that source 0 lacks: extra.0.weight, extra.0.bias")
    ):
        check_compatible([plain, extended])
    with pytest.raises(
        ValueError, match=re.escape("source 2 lacks 2 key(s) that source 0 has: extra.0.weight, extra.0.bias")
    ):
        check_compatible([extended, TinyConvNet(n_extra=1), plain])
    # Leaving the differing module out makes them comparable.
    check_compatible([plain, extended], exclude=["extra"])


def test_sources_of_another_dtype_are_refused_not_cast():
    """A merge computes in source 0's dtype: a source in half precision would be cast silently."""
    with pytest.raises(
        ValueError,
        match=r"source 1 and source 0 differ in dtype for \d+ tensor\(s\) \(source 1 vs source 0\): "
        r"conv1\.weight torch\.float16 vs torch\.float32.*network\.float\(\)",
    ):
        check_compatible([_resnet(seed=0), _resnet(seed=1).half()])
    check_compatible([_resnet(seed=0).double(), _resnet(seed=1).double()])


def test_many_differing_keys_are_summarised():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "8 key(s) that source 0 lacks: "
            "extra.0.weight, extra.0.bias, extra.1.weight, extra.1.bias, extra.2.weight (and 3 more)"
        ),
    ):
        check_compatible([TinyConvNet(), TinyConvNet(n_extra=4)])


def test_shape_mismatch_names_tensor_and_shapes():
    three, seven = _resnet(num_classes=3), _resnet(num_classes=7)
    with pytest.raises(ValueError, match=re.escape("fc.weight (7, 512) vs (3, 512), fc.bias (7,) vs (3,)")):
        check_compatible([three, seven])
    check_compatible([three, seven], exclude=["fc"])
    check_compatible([three, seven], exclude="fc")
    # Excluding is by whole dotted names: "f" is not a prefix of the module "fc".
    with pytest.raises(ValueError, match="fc.weight"):
        check_compatible([three, seven], exclude=["f"])


def test_nan_and_inf_named_by_source_and_tensor():
    a = _resnet(seed=0)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.layer1[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=re.escape("source 1 tensor layer1.0.conv1.weight has 1 non-finite value(s) (1 NaN, 0 Inf)")
    ):
        check_compatible([a, b])

    c = copy.deepcopy(a)
    with torch.no_grad():
        c.conv1.weight[0, 0, :2, 0] = float("inf")
        c.conv1.weight[1, 0, 0, 0] = float("-inf")
    with pytest.raises(
        ValueError, match=re.escape("source 0 tensor conv1.weight has 3 non-finite value(s) (0 NaN, 3 Inf)")
    ):
        check_compatible([c, a])


def test_nan_in_buffer_is_found_and_excluded_head_is_ignored():
    torch.manual_seed(0)
    a = TinyConvNet()
    b = copy.deepcopy(a)
    b.norm.running_var[3] = float("nan")
    with pytest.raises(ValueError, match=re.escape("source 1 tensor norm.running_var has 1 non-finite value(s)")):
        check_compatible([a, b])

    d = copy.deepcopy(a)
    with torch.no_grad():
        d.head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=re.escape("source 1 tensor head.weight has 8 non-finite value(s) (8 NaN")):
        check_compatible([a, d])
    check_compatible([a, d], exclude=["head"])


# load_checkpoint and load_source from files


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    net = _resnet()
    path = tmp_path / f"source{suffix}"
    save_checkpoint(net, path)
    _assert_same_state(load_checkpoint(path), net.state_dict())

    loaded = load_source(path, RESNET_CONFIG)
    assert type(loaded) is type(net)
    assert not loaded.training
    _assert_same_state(loaded.state_dict(), net.state_dict())


def test_load_files_written_by_other_tools(tmp_path):
    net = _resnet()
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    safetensors.torch.save_file(net.state_dict(), tmp_path / "plain.safetensors")
    for name in ["plain.pt", "plain.safetensors"]:
        _assert_same_state(load_checkpoint(tmp_path / name), net.state_dict())


def test_network_def_forms(tmp_path):
    net = _resnet(seed=1)
    path = tmp_path / "source.pt"
    save_checkpoint(net, path)

    target = _resnet(seed=2).train()
    loaded = load_source(path, target)
    assert loaded is target
    assert not target.training
    _assert_same_state(target.state_dict(), net.state_dict())

    loaded = load_source(str(path), functools.partial(resnet18, spatial_dims=2, n_input_channels=1, num_classes=3))
    _assert_same_state(loaded.state_dict(), net.state_dict())

    with pytest.raises(ValueError, match=re.escape(f"network_def is required to load checkpoint file {path}")):
        load_source(path)
    with pytest.raises(ValueError, match="without '_target_'"):
        load_source(path, {"spatial_dims": 2})
    with pytest.raises(ValueError, match=r"built a builtins\.str, not a torch\.nn\.Module"):
        load_source(path, lambda: "not a network")


def test_ddp_prefix_stripped_only_when_on_every_key(tmp_path):
    torch.manual_seed(0)
    sd = TinyConvNet().state_dict()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    _assert_same_state(load_checkpoint(tmp_path / "ddp.pt"), sd)
    _assert_same_state(load_source(tmp_path / "ddp.pt", TinyConvNet).state_dict(), sd)

    partial = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    torch.save(partial, tmp_path / "partial.pt")
    assert list(load_checkpoint(tmp_path / "partial.pt")) == ["module.a", "b"]


def test_containers_unwrapped(tmp_path):
    sd = _resnet(seed=0).state_dict()
    torch.manual_seed(1)
    other = TinyConvNet().state_dict()
    torch.save({"state_dict": sd, "epoch": 3, "best_metric": 0.9}, tmp_path / "nested.ckpt")
    _assert_same_state(load_checkpoint(tmp_path / "nested.ckpt"), sd)
    _assert_same_state(load_source(tmp_path / "nested.ckpt", RESNET_CONFIG).state_dict(), sd)

    # "state_dict" comes before "model" in the search order; an explicit key overrides the search.
    torch.save({"model": other, "state_dict": sd, "ema": other}, tmp_path / "both.pt")
    _assert_same_state(load_checkpoint(tmp_path / "both.pt"), sd)
    _assert_same_state(load_checkpoint(tmp_path / "both.pt", key="ema"), other)
    _assert_same_state(load_source(tmp_path / "both.pt", TinyConvNet, key="ema").state_dict(), other)

    torch.save({"model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}}, tmp_path / "m.pt")
    _assert_same_state(load_checkpoint(tmp_path / "m.pt"), sd)

    with pytest.raises(ValueError, match=r"both\.pt has no key 'weights'; available keys: model, state_dict, ema"):
        load_checkpoint(tmp_path / "both.pt", key="weights")

    torch.save({"epoch": 3, "weights": sd}, tmp_path / "unknown.pt")
    with pytest.raises(ValueError, match=r"unknown\.pt holds no state dict.*available keys: epoch, weights"):
        load_checkpoint(tmp_path / "unknown.pt")
    _assert_same_state(load_checkpoint(tmp_path / "unknown.pt", key="weights"), sd)


def test_bad_paths_and_files(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_source(missing, RESNET_CONFIG)

    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"suffix '\.bin'.*allowed: \.pt, \.pth, \.ckpt, \.safetensors"):
        load_checkpoint(tmp_path / "weights.bin")

    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt"):
        load_checkpoint(tmp_path / "garbage.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        load_checkpoint(tmp_path / "garbage.safetensors")

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match=r"tensor\.pt is a torch\.Tensor, not a state dict"):
        load_checkpoint(tmp_path / "tensor.pt")


def test_mismatched_weights_name_file_and_keys(tmp_path):
    path = tmp_path / "three_classes.pt"
    sd = _resnet(num_classes=3).state_dict()
    save_checkpoint(sd, path)

    target = _resnet(num_classes=7, seed=5)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"three_classes\.pt.*fc\.weight \(3, 512\) in checkpoint vs \(7, 512\)"):
        load_source(path, target)
    # The check runs before any copy, so the passed-in network is left untouched.
    _assert_same_state(target.state_dict(), before)
    # Shapes are an error even when keys need not match.
    with pytest.raises(ValueError, match="fc.bias"):
        load_source(path, target, strict=False)

    del sd["fc.bias"]
    sd["extra.weight"] = torch.zeros(1)
    save_checkpoint(sd, path)
    with pytest.raises(ValueError, match=r"1 missing key\(s\): fc\.bias; 1 unexpected key\(s\): extra\.weight"):
        load_source(path, RESNET_CONFIG)
    loaded = load_source(path, RESNET_CONFIG, strict=False)
    assert torch.equal(loaded.fc.weight, sd["fc.weight"])


# malicious checkpoints


# pickle.dump writes protocol 4, which makes torch warn before it refuses the file.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_runs_code_is_refused(tmp_path):
    evil_marker = tmp_path / "pwned"
    control_marker = tmp_path / "control"

    # The crafted object really does run code when unpickled unsafely; the test would otherwise pass vacuously.
    torch.save({"weight": torch.zeros(2), "payload": TouchOnUnpickle(control_marker)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control_marker.exists()
    control_marker.unlink()
    pickle.loads(pickle.dumps(TouchOnUnpickle(control_marker)))
    assert control_marker.exists()

    torch.save({"weight": torch.zeros(2), "payload": TouchOnUnpickle(evil_marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil_legacy.pt", "wb") as f:
        pickle.dump({"weight": torch.zeros(2), "payload": TouchOnUnpickle(evil_marker)}, f)

    refused = "refused to load checkpoint .*{}: it contains objects other than tensors and plain containers"
    for name in ["evil.pt", "evil_legacy.pt"]:
        with pytest.raises(ValueError, match=refused.format(re.escape(name))) as info:
            load_checkpoint(tmp_path / name)
        assert isinstance(info.value.__cause__, pickle.UnpicklingError)
        with pytest.raises(ValueError, match=refused.format(re.escape(name))):
            load_source(tmp_path / name, RESNET_CONFIG)

    bundle = _make_bundle(tmp_path / "evil_bundle", {"num_classes": 3, "network_def": RESNET_CONFIG})
    (bundle / "models" / "model.pt").write_bytes((tmp_path / "evil.pt").read_bytes())
    with pytest.raises(ValueError, match=refused.format(re.escape("model.pt"))):
        load_source(bundle)

    assert not evil_marker.exists()


# MONAI bundle folders


def _make_bundle(folder: pathlib.Path, config: dict, config_name: str = "inference.json") -> pathlib.Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    dump = yaml.safe_dump if config_name.endswith((".yaml", ".yml")) else json.dumps
    (folder / "configs" / config_name).write_text(dump(config))
    return folder


BUNDLE_CONFIG = {
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "num_classes": 3,
    "network_def": {
        "_target_": "monai.networks.nets.resnet18",
        "spatial_dims": 2,
        "n_input_channels": 1,
        "num_classes": "@num_classes",
    },
    "network": "$@network_def.to(@device)",
}


def test_bundle_folder(tmp_path):
    net = _resnet(seed=3)
    bundle = _make_bundle(tmp_path / "bundle", BUNDLE_CONFIG)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")

    loaded = load_source(bundle)
    assert type(loaded) is type(net)
    assert loaded.fc.out_features == 3
    assert not loaded.training
    _assert_same_state(loaded.state_dict(), net.state_dict())

    # The network_def argument overrides the bundle's config.
    with pytest.raises(ValueError, match=r"model\.pt.*fc\.weight \(3, 512\) in checkpoint vs \(5, 512\)"):
        load_source(str(bundle), {**RESNET_CONFIG, "num_classes": 5})

    # models/model.safetensors is preferred over models/model.pt.
    other = _resnet(seed=4)
    save_checkpoint(other, bundle / "models" / "model.safetensors")
    _assert_same_state(load_source(bundle).state_dict(), other.state_dict())


def test_bundle_train_yaml_fallback(tmp_path):
    net = _resnet(seed=3)
    bundle = _make_bundle(tmp_path / "bundle", BUNDLE_CONFIG, config_name="train.yaml")
    save_checkpoint(net, bundle / "models" / "model.pt")
    _assert_same_state(load_source(bundle).state_dict(), net.state_dict())


def test_bundle_errors_name_missing_file_or_id(tmp_path):
    bundle = _make_bundle(tmp_path / "bundle", BUNDLE_CONFIG)
    with pytest.raises(
        ValueError, match=re.escape(f"bundle folder {bundle} has neither models/model.safetensors nor models/model.pt")
    ):
        load_source(bundle)

    save_checkpoint(_resnet(), bundle / "models" / "model.pt")
    (bundle / "configs" / "inference.json").unlink()
    with pytest.raises(
        ValueError, match=r"has no configs/inference\.json\|yaml\|yml or configs/train\.json\|yaml\|yml"
    ):
        load_source(bundle)
    # With an explicit network_def the config is not needed.
    assert load_source(bundle, RESNET_CONFIG).fc.out_features == 3

    (bundle / "configs" / "inference.json").write_text(json.dumps({"num_classes": 3}))
    with pytest.raises(
        ValueError,
        match=re.escape(f"bundle folder {bundle}: configs/inference.json has no id 'network_def'"),
    ):
        load_source(bundle)


# save_checkpoint


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, suffix, monkeypatch):
    path = tmp_path / f"merged{suffix}"
    first, second = _resnet(seed=0), _resnet(seed=1)
    save_checkpoint(first, path)
    assert os.listdir(tmp_path) == [path.name]
    save_checkpoint(second.state_dict(), path)
    assert os.listdir(tmp_path) == [path.name]
    _assert_same_state(load_checkpoint(path), second.state_dict())

    def fail_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    def fail_fsync(fd):
        raise OSError("disk full")

    # A failure before the rename keeps the previous complete file and removes the partial one.
    if suffix == ".pt":
        monkeypatch.setattr(torch, "save", fail_mid_write)
    else:
        monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(first, path)
    assert os.listdir(tmp_path) == [path.name]
    _assert_same_state(load_checkpoint(path), second.state_dict())


def test_save_safetensors_shared_and_non_contiguous(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(4, 6)
    sd = {"tied_a": w, "tied_b": w, "transposed": w.t(), "rows": w[1:3]}
    # safetensors alone refuses this state dict, so the saver must do real work.
    with pytest.raises(RuntimeError):
        safetensors.torch.save_file(sd, tmp_path / "raw.safetensors")
    save_checkpoint(sd, tmp_path / "fixed.safetensors")
    loaded = load_checkpoint(tmp_path / "fixed.safetensors")
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"suffix '\.bin'"):
        save_checkpoint({"a": torch.zeros(1)}, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="1 entry.*not tensors.*: epoch"):
        save_checkpoint({"a": torch.zeros(1), "epoch": 3}, tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        save_checkpoint({"a": torch.zeros(1)}, tmp_path / "missing_folder" / "x.pt")
    assert os.listdir(tmp_path) == []


# the config of a source bundle is data: nothing in it runs


def _touch(marker: pathlib.Path) -> str:
    return f"$__import__('pathlib').Path({str(marker)!r}).touch() or 3"


RESNET_ARGS = {"spatial_dims": 2, "n_input_channels": 1, "num_classes": "@num_classes"}


def _evil_configs(marker: pathlib.Path, folder: pathlib.Path) -> dict[str, tuple[dict, str, str]]:
    """name -> (bundle config, the id the error must name, the value it must quote); each would create ``marker``."""
    resnet = {"_target_": "monai.networks.nets.resnet18", **RESNET_ARGS}
    other = folder.parent / f"{folder.name}_other.json"
    other.write_text(json.dumps({"n": _touch(marker)}))
    system = {"_target_": "os.system", "command": f"touch {marker}"}
    touch = {"_target_": "pathlib.Path.touch", "self": str(marker)}
    return {
        "expression as network_def": ({"network_def": _touch(marker)}, "network_def", "$__import__"),
        "expression in an argument": (
            {"network_def": {**resnet, "num_classes": _touch(marker)}},
            "network_def#num_classes",
            "$__import__",
        ),
        "os.system nested in an argument": (
            {"network_def": {**resnet, "act": system}},
            "network_def#act#_target_",
            "os.system",
        ),
        "Path.touch as the network": ({"network_def": touch}, "network_def#_target_", "pathlib.Path.touch"),
        "Path.touch in a list argument": (
            {"network_def": {**resnet, "act": [touch]}},
            "network_def#act#0#_target_",
            "pathlib.Path.touch",
        ),
        "reference to an expression": (
            {"network_def": {**resnet, "num_classes": "@n"}, "n": _touch(marker)},
            "n",
            "$__import__",
        ),
        "reference to a component": ({"network_def": {**resnet, "act": "@a"}, "a": system}, "a", "os.system"),
        "macro to another file": (
            {"network_def": {**resnet, "num_classes": f"%{other}#n"}},
            "network_def#num_classes",
            str(other),
        ),
        "expression in _requires_": (
            {"network_def": {**resnet, "_requires_": _touch(marker)}},
            "network_def#_requires_",
            "$__import__",
        ),
    }


EVIL_CASES = [
    "expression as network_def",
    "expression in an argument",
    "os.system nested in an argument",
    "Path.touch as the network",
    "Path.touch in a list argument",
    "reference to an expression",
    "reference to a component",
    "macro to another file",
    "expression in _requires_",
]


@pytest.mark.parametrize("case", EVIL_CASES)
def test_source_bundle_config_that_runs_code_is_refused(tmp_path, case):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    cases = _evil_configs(marker, tmp_path / "bundle")
    assert list(cases) == EVIL_CASES
    config, culprit_id, culprit = cases[case]
    bundle = _make_bundle(tmp_path / "bundle", {"bundle_root": ".", "num_classes": 3, **config})
    save_checkpoint(_resnet(), bundle / "models" / "model.pt")

    # the config really runs code when MONAI parses it: the same config with another marker creates that file
    control_config, _, _ = _evil_configs(control, tmp_path / "control_bundle")[case]
    try:
        ConfigParser({"num_classes": 3, **control_config}).get_parsed_content("network_def")
    except Exception:
        pass  # most of them fail after the code has run
    assert control.exists()

    with pytest.raises(UntrustedConfigError) as info:
        load_source(bundle)
    message = str(info.value)
    assert message.startswith(f"source bundle {bundle}: configs/inference.json: id '{culprit_id}'")
    assert culprit in message
    assert "trust_config=True" in message and "trust_config: true" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(UntrustedConfigError, match=re.escape(f"id '{culprit_id}'")):
        load_sources([bundle, {"bundle": bundle}])
    assert not marker.exists()


def test_trusted_source_bundle_config_is_evaluated(tmp_path):
    marker = tmp_path / "ran"
    config = {"num_classes": 3, "network_def": {"_target_": "monai.networks.nets.resnet18", **RESNET_ARGS}}
    config["network_def"]["num_classes"] = _touch(marker)
    bundle = _make_bundle(tmp_path / "bundle", config)
    net = _resnet(seed=2)
    save_checkpoint(net, bundle / "models" / "model.pt")
    with pytest.raises(UntrustedConfigError):
        load_source(bundle)
    assert not marker.exists()

    loaded = load_source(bundle, trust_config=True)
    assert marker.exists()
    _assert_same_state(loaded.state_dict(), net.state_dict())

    marker.unlink()
    with pytest.raises(UntrustedConfigError):
        load_sources([bundle, {"bundle": bundle, "trust_config": False}])
    assert not marker.exists()
    both = load_sources([{"bundle": bundle, "trust_config": True}, {"bundle": str(bundle), "trust_config": True}])
    assert marker.exists() and len(both) == 2
    with pytest.raises(ValueError, match=r"sources\[1\]: trust_config must be true or false, got 'yes'"):
        load_sources([bundle, {"bundle": bundle, "trust_config": "yes"}])


def test_source_bundle_config_read_as_data_loads(tmp_path):
    # references to literals (nested ids with both separators, relative ids, metadata), a download switch that is
    # off through a reference; the ids that are expressions are not the network's and are left alone
    config = {
        "bundle_root": ".",
        "imports": ["$import os"],
        "device": "$torch.device('cpu')",
        "network": "$@network_def.to(@device)",
        "args": {"dims": 2, "channels": [1]},
        "use_pretrained": False,
        "conv_size": 7,
        "network_def": {
            "_target_": "monai.networks.nets.resnet18",
            "spatial_dims": "@args#dims",
            "n_input_channels": "@args::channels::0",
            "num_classes": "@_meta_#network_data_format#outputs#pred#num_channels",
            "conv1_t_size": "@##conv_size",
            "conv1_t_stride": 2,
            "widen_factor": "@#conv1_t_stride",
            "pretrained": "@use_pretrained",
        },
    }
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3, widen_factor=2)
    bundle = _make_bundle(tmp_path / "bundle", config, config_name="train.yaml")
    meta = {"network_data_format": {"outputs": {"pred": {"num_channels": 3}}}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    save_checkpoint(net, bundle / "models" / "model.safetensors")
    loaded = load_source(bundle)
    assert type(loaded) is type(net) and loaded.fc.out_features == 3 and loaded.conv1.out_channels == 128
    _assert_same_state(loaded.state_dict(), net.state_dict())

    # a short _target_ and a same-file macro, with torch.nn components nested in the arguments
    adapter = NetAdapter(model=resnet18(spatial_dims=2, n_input_channels=1, num_classes=4), num_classes=2, dim=2)
    nested = {
        "num_classes": 2,
        "network_def": {
            "_target_": "NetAdapter",
            "model": {"_target_": "monai.networks.nets.resnet18", **RESNET_ARGS, "num_classes": 4},
            "num_classes": "@num_classes",
            "dim": "%dims",
        },
        "dims": 2,
    }
    other = _make_bundle(tmp_path / "adapter", nested)
    save_checkpoint(adapter, other / "models" / "model.pt")
    loaded = load_source(other)
    assert type(loaded) is NetAdapter
    _assert_same_state(loaded.state_dict(), adapter.state_dict())


@pytest.mark.parametrize(
    "network_def, culprit_id, message",
    [
        (
            {"_target_": "monai.networks.nets.resnet18", **RESNET_ARGS, "pretrained": True},
            "network_def#pretrained",
            "would download",
        ),
        (
            {"_target_": "monai.networks.nets.EfficientNetBN", "model_name": "efficientnet-b0"},
            "network_def#pretrained",
            "the default of monai.networks.nets.EfficientNetBN",
        ),
        (
            {"_target_": "monai.networks.nets.get_pretrained_resnet_medicalnet", "resnet_depth": 18},
            "network_def#_target_",
            "no network class or network factory",
        ),
        (
            {"_target_": "monai.networks.nets.resnet.optional_import", "module": "os"},
            "network_def#_target_",
            "no network class or network factory",
        ),
        ({"_target_": "torch.nn.Module.apply"}, "network_def#_target_", "cannot be imported"),
        ({"_target_": "torch.nn.__builtins__"}, "network_def#_target_", "outside the allowed network modules"),
        ({"_target_": "torch.nnx.Linear"}, "network_def#_target_", "outside the allowed network modules"),
        (
            {"_target_": "monai.networks.nets.resnet18", **RESNET_ARGS, "_mode_": "callable"},
            "network_def#_mode_",
            "other than 'default'",
        ),
        (
            {"_target_": "monai.networks.nets.resnet18", **RESNET_ARGS, "num_classes": "@nowhere"},
            None,
            "names id 'nowhere', which the config does not have",
        ),
        (
            {"_target_": "monai.networks.nets.resnet18", **RESNET_ARGS, "num_classes": "@a"},
            None,
            "references loop: network_def#num_classes -> a -> b -> a",
        ),
    ],
)
def test_source_bundle_config_refusals_name_the_culprit(tmp_path, network_def, culprit_id, message):
    bundle = _make_bundle(tmp_path / "bundle", {"num_classes": 3, "a": "@b", "b": "@a", "network_def": network_def})
    save_checkpoint(_resnet(), bundle / "models" / "model.pt")
    error = UntrustedConfigError if culprit_id is not None else ValueError
    with pytest.raises(error, match=re.escape(message)) as info:
        load_source(bundle)
    if culprit_id is not None:
        assert f"id '{culprit_id}'" in str(info.value)
    else:
        assert not isinstance(info.value, UntrustedConfigError)


# one state-dict comparison


def test_state_dict_diff():
    net = TinyConvNet()
    state = dict(net.state_dict())
    assert state_dict_diff(net, state) == []
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["conv.weight"] = torch.zeros(5, 1, 3, 3)
    assert state_dict_diff(net, state) == [
        "1 missing key(s): head.bias",
        "1 unexpected key(s): extra.weight",
        "1 shape mismatch(es): conv.weight (5, 1, 3, 3) in checkpoint vs (4, 1, 3, 3) in network",
    ]
    # keys need not match when not strict; shapes always do; a state dict stands for its network
    assert state_dict_diff(net.state_dict(), state, strict=False, source="file") == [
        "1 shape mismatch(es): conv.weight (5, 1, 3, 3) in file vs (4, 1, 3, 3) in network"
    ]
    many = {f"x{i}": torch.zeros(1) for i in range(7)}
    assert state_dict_diff({}, many) == ["7 unexpected key(s): x0, x1, x2, x3, x4 (and 2 more)"]


def test_read_network_def_gives_the_checked_plain_config():
    config = {
        "width": 4,
        "network_def": {
            "_target_": "DenseNet121",
            "_desc_": "dropped",
            "_requires_": "@width",
            "_mode_": "default",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": "@width",
            "act": ["relu", {"inplace": "%flag"}],
        },
        "flag": True,
    }
    plain = read_network_def(config)
    assert plain == {
        "_target_": "monai.networks.nets.densenet.DenseNet121",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 4,
        "act": ["relu", {"inplace": True}],
    }
    assert config["network_def"]["out_channels"] == "@width"  # the input is left as it was
    net = build_network_def(plain)
    assert type(net).__name__ == "DenseNet121" and net.class_layers.out.out_features == 4
    for disabled in (True, "True", 1):
        with pytest.raises(ValueError, match=r"config: id 'network_def' is disabled"):
            read_network_def({**config, "network_def": {**config["network_def"], "_disabled_": disabled}})
    with pytest.raises(UntrustedConfigError, match=r"id 'network_def#_target_' holds 'os\.system'"):
        build_network_def({"_target_": "os.system", "command": "true"})


def test_exported_network_def_holds_no_expression():
    # what the export writes into inference.yaml is data too: a value that is still an expression after resolving
    # (it would run when MONAI loads the exported bundle) is refused
    from monai_medmerge.bundle import resolve_network_def

    config = {"network_def": {"_target_": "ResNet", "block": "basic", "conv1_t_size": "$'$' + 'print(1)'"}}
    with pytest.raises(ValueError, match=r"field 'conv1_t_size' resolved to the expression '\$print\(1\)'"):
        resolve_network_def(config)
