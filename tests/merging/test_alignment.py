"""Alignment: traced permutation groups, function preservation and weight matching on real MONAI networks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyNet, make_source
from monai.networks.nets import densenet121, resnet10, resnet18, seresnet50
from torch import nn

from monai_medmerge.merging import (
    UnsupportedOperationError,
    align_sources,
    apply_permutation,
    get_method,
    permutation_spec,
    weight_matching,
)


def _resnet10(spatial_dims, num_classes=3):
    return resnet10(spatial_dims=spatial_dims, n_input_channels=1, num_classes=num_classes)


def _resnet18(spatial_dims, num_classes=3):
    return resnet18(spatial_dims=spatial_dims, n_input_channels=1, num_classes=num_classes)


def _densenet121(spatial_dims, num_classes=3):
    return densenet121(spatial_dims=spatial_dims, in_channels=1, out_channels=num_classes)


def _seresnet50(spatial_dims, num_classes=3):
    return seresnet50(spatial_dims=spatial_dims, in_channels=1, num_classes=num_classes)


def _tinynet(spatial_dims, num_classes=3):
    return TinyNet(spatial_dims=spatial_dims, num_classes=num_classes)


ARCHS = {"resnet10": _resnet10, "resnet18": _resnet18, "densenet121": _densenet121, "seresnet50": _seresnet50,
         "custom": _tinynet}  # fmt: skip
CASES = [(a, 2) for a in ARCHS] + [("resnet10", 3), ("densenet121", 3), ("seresnet50", 3), ("custom", 3)]


def _input(spatial_dims, seed=0):
    size = 32
    return torch.randn(4, 1, *([size] * spatial_dims), generator=torch.Generator().manual_seed(seed))


def _source(arch, spatial_dims, seed, num_classes=3):
    return make_source(ARCHS[arch], seed, spatial_dims=spatial_dims, num_classes=num_classes)


def _trained(net, spatial_dims, steps=3):
    """A few optimiser steps on random data: weights no longer at their random initialisation, BN stats updated."""
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for step in range(steps):
        x = _input(spatial_dims, seed=100 + step)
        y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def _out(net, x):
    return net.eval()(x)


def _changed(before: nn.Module, after: nn.Module) -> int:
    sa, sb = before.state_dict(), after.state_dict()
    return sum(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())


@pytest.mark.parametrize("arch,spatial_dims", CASES)
def test_alignment_preserves_function_of_random_sources(arch, spatial_dims):
    a, b = _source(arch, spatial_dims, 0), _source(arch, spatial_dims, 1, num_classes=5)
    x = _input(spatial_dims, seed=7)
    report = {}
    # two passes of matching are enough to move channels; any permutation must keep the function
    aligned = align_sources([a, b], anchor=0, example_input=x, report=report, max_iter=2)
    assert torch.allclose(_out(aligned[1], x), _out(b, x), rtol=1e-4, atol=1e-4)
    assert torch.equal(_out(aligned[0], x), _out(a, x))
    # the alignment really moved channels and made the source closer to the anchor
    assert _changed(b, aligned[1]) > 0
    assert report[1]["objective_end"] > report[1]["objective_start"]


@pytest.mark.parametrize(
    "arch,spatial_dims", [("resnet10", 2), ("resnet18", 3), ("densenet121", 2), ("seresnet50", 2), ("custom", 3)]
)
def test_alignment_preserves_function_of_trained_sources(arch, spatial_dims):
    a = _trained(_source(arch, spatial_dims, 0), spatial_dims)
    b = _trained(_source(arch, spatial_dims, 1, num_classes=7), spatial_dims)
    x = _input(spatial_dims, seed=9)
    aligned = align_sources([a, b], anchor=0, example_input=x, max_iter=2)
    assert _changed(b, aligned[1]) > 0
    assert torch.allclose(_out(aligned[1], x), _out(b, x), rtol=1e-4, atol=1e-4)
    # the head's class axis is never permuted: its bias (one entry per class) is untouched
    head = {"densenet121": "class_layers.out.bias", "seresnet50": "last_linear.bias"}.get(arch, "fc.bias")
    assert torch.equal(aligned[1].state_dict()[head], b.state_dict()[head])


@pytest.mark.parametrize("arch,spatial_dims", [("resnet18", 2), ("densenet121", 2), ("seresnet50", 2), ("resnet10", 3)])
def test_alignment_recovers_a_channel_shuffle(arch, spatial_dims):
    net = _source(arch, spatial_dims, 0)
    spec = permutation_spec(net, _input(spatial_dims))
    g = torch.Generator().manual_seed(3)
    perms = {name: torch.randperm(n, generator=g) for name, n in spec.sizes.items()}
    shuffled = copy.deepcopy(net)
    shuffled.load_state_dict(apply_permutation(spec, perms, net.state_dict()))
    x = _input(spatial_dims, seed=1)
    assert _changed(net, shuffled) > 0
    assert torch.allclose(_out(shuffled, x), _out(net, x), rtol=1e-4, atol=1e-4)

    aligned = align_sources([net, shuffled], anchor=0, example_input=x)[1]
    for key, value in net.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], value), key


def test_spec_groups_follow_residuals_concatenations_and_se_gates():
    spec = permutation_spec(_resnet18(2), _input(2))
    # resnet18 (2-D): a group for the residual stream of each stage and one for each block's inner conv
    assert len(spec.sizes) == 4 + 8
    stem = spec.slices["conv1"]
    keys = {s.key for s in stem}
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv2.weight", "layer1.1.conv1.weight"} <= keys
    fc = [s for g in spec.slices.values() for s in g if s.key == "fc.weight"]
    assert [(s.axis, s.length) for s in fc] == [(1, 512)]  # the head's input axis only

    dense = permutation_spec(_densenet121(2), _input(2))
    norm2 = [
        (s.offset, s.length) for g in dense.slices.values() for s in g if s.key == "features.transition1.norm.weight"
    ]
    assert sorted(norm2) == [(0, 64)] + [(64 + 32 * i, 32) for i in range(6)]  # stem + 6 concatenated layers

    se = permutation_spec(_seresnet50(2), _input(2))
    gate = [g for g, slices in se.slices.items() if any(s.key == "layer1.0.se_layer.fc.2.weight" for s in slices)]
    assert len(gate) == 2  # its output rows belong to the block's residual stream, its input to the squeeze


def test_linear_reading_a_flattened_map_is_permuted_in_blocks():
    class FlatNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4).flatten(1))

    a, b = make_source(FlatNet, 0), make_source(FlatNet, 1)
    x = _input(2)
    spec = permutation_spec(a, x)
    (fc,) = [s for s in spec.slices["conv"] if s.key == "fc.weight"]
    assert (fc.axis, fc.length, fc.inner) == (1, 6, 16)
    aligned = align_sources([a, b], example_input=x)[1]
    assert _changed(b, aligned) > 0
    assert torch.allclose(_out(aligned, x), _out(b, x), atol=1e-5)


def test_unsupported_operation_names_module_and_operation():
    class Rolling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.mix = nn.Identity()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.roll(self.mix(self.conv(x)), 1, dims=1)
            return self.fc(h.mean((2, 3)))

    with pytest.raises(UnsupportedOperationError, match=r"module 'Rolling'.*'roll'"):
        permutation_spec(Rolling(), _input(2))

    class Slicing(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(1, 4, 3))
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(self.block(x)[:, :2].mean((2, 3)))

    with pytest.raises(UnsupportedOperationError, match="slicing the channel axis"):
        permutation_spec(Slicing(), _input(2))


def test_weight_matching_keeps_a_source_equal_to_the_anchor():
    net = _source("resnet10", 2, 0)
    spec = permutation_spec(net, _input(2))
    perms, info = weight_matching(spec, net.state_dict(), net.state_dict())
    assert all(torch.equal(p, torch.arange(len(p))) for p in perms.values())
    assert info["passes"] == 1


def test_align_flag_on_merge_methods():
    a, b = _source("resnet10", 2, 0), _source("resnet10", 2, 1)
    x = _input(2, seed=5)
    spec = permutation_spec(a, x)
    g = torch.Generator().manual_seed(4)
    shuffled = copy.deepcopy(a)
    shuffled.load_state_dict(
        apply_permutation(spec, {n: torch.randperm(k, generator=g) for n, k in spec.sizes.items()}, a.state_dict())
    )
    # averaging a network with a shuffled copy of itself: broken without alignment, exact with it
    naive = get_method("average").merge([a, shuffled])
    aligned = get_method("average", align=True).merge([a, shuffled])
    assert torch.allclose(_out(aligned, x), _out(a, x), atol=1e-5)
    assert not torch.allclose(_out(naive, x), _out(a, x), atol=1e-2)
    # the anchor's channel order is kept: the endpoint of the other source computes that source's function
    end = get_method("interpolate", t=1.0, align=True).merge([a, b])
    assert _changed(b, end) > 0
    assert torch.allclose(_out(end, x), _out(b, x), rtol=1e-4, atol=1e-4)
    anchored = get_method("kernel", anchor=1, align=True).build([a, b], head="fc", out_channels=4)
    assert anchored.num_sources == 2
    assert get_method("kernel").settings["align"] is False


def test_align_sources_checks_arguments():
    a = _source("custom", 2, 0)
    with pytest.raises(ValueError, match="at least 2 sources"):
        align_sources([a])
    with pytest.raises(ValueError, match="anchor must be a source index"):
        align_sources([a, a], anchor=2)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "custom"])
def test_activation_matching_recovers_a_shuffle_and_preserves_function(arch):
    net = _source(arch, 2, 0)
    x = _input(2, seed=2)
    spec = permutation_spec(net, x)
    g = torch.Generator().manual_seed(5)
    shuffled = copy.deepcopy(net)
    shuffled.load_state_dict(
        apply_permutation(spec, {n: torch.randperm(k, generator=g) for n, k in spec.sizes.items()}, net.state_dict())
    )
    report = {}
    data = [(_input(2, seed=s), torch.zeros(4)) for s in (10, 11)]
    aligned = align_sources([net, shuffled], example_input=x, matching="activations", data=data, report=report)[1]
    for key, value in net.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], value), key
    # (dead or constant channels correlate with nothing, so the mean stays below 1)
    assert report[1]["mean_correlation_end"] > report[1]["mean_correlation_start"] + 0.5

    other = _trained(_source(arch, 2, 1, num_classes=6), 2)
    moved = align_sources([net, other], example_input=x, matching="activations", data=[x])[1]
    assert _changed(other, moved) > 0
    assert torch.allclose(_out(moved, x), _out(other, x), rtol=1e-4, atol=1e-4)


def test_activation_matching_needs_data_and_a_known_method():
    a, b = _source("custom", 2, 0), _source("custom", 2, 1)
    with pytest.raises(ValueError, match="at least one batch"):
        align_sources([a, b], matching="activations", data=[])
    with pytest.raises(ValueError, match="activation"):
        align_sources([a, b], matching="correlation")
