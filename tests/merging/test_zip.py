"""Zipping N networks into one of a chosen width: the ensemble at N times the width, the sources' function kept,
the greedy feature merge, structure errors, and the cost counter."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet
from monai.networks.nets import DenseNet, ResNet, UNet
from torch import nn

from monai_medmerge.merging import (
    UnsupportedOperationError,
    apply_permutation,
    inference_macs,
    permutation_spec,
    zip_matrices,
    zip_networks,
)


def _resnet(widths, num_classes=4, layers=(1, 1, 1, 1)):
    return ResNet("basic", list(layers), list(widths), spatial_dims=2, n_input_channels=1, conv1_t_size=3,
                  conv1_t_stride=1, no_max_pool=True, num_classes=num_classes)  # fmt: skip


def _densenet(init_features, growth_rate, num_classes=3):
    return DenseNet(spatial_dims=2, in_channels=1, out_channels=num_classes, init_features=init_features,
                    growth_rate=growth_rate, block_config=(2, 2), bn_size=2)  # fmt: skip


def _unet(channels, num_res_units=0):
    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=channels, strides=(2, 2), norm="batch",
                num_res_units=num_res_units)  # fmt: skip


class FlatNet(nn.Module):
    """A CNN whose classifier reads the flattened feature map (blocks of 16 entries per channel), then an MLP."""

    def __init__(self, width: int = 6, hidden: int = 12, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(width * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.norm(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def _source(build, seed):
    """A network from its own initialisation with random norm parameters and statistics (eval mode)."""
    torch.manual_seed(seed)
    net = build()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.weight.normal_(1.0, 0.3, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
                m.running_mean.normal_(0.0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return net.eval()


def _images(n=16, seed=0):
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _ensemble(sources, x):
    return torch.stack([s.eval()(x) for s in sources]).mean(0)


CASES = {
    "resnet": (lambda: _resnet((8, 16, 16, 32)), lambda n: _resnet((8 * n, 16 * n, 16 * n, 32 * n)), 2),
    "densenet": (lambda: _densenet(8, 4), lambda n: _densenet(8 * n, 4 * n), 3),
    "unet": (lambda: _unet((4, 8, 16)), lambda n: _unet((4 * n, 8 * n, 16 * n)), 2),
    "flattened": (lambda: FlatNet(), lambda n: FlatNet(6 * n, 12 * n), 2),
}


@pytest.mark.parametrize("arch", CASES)
def test_zip_at_n_times_the_width_is_the_ensemble(arch):
    small, wide, n = CASES[arch]
    sources = [_source(small, seed) for seed in range(n)]
    x = _images()
    report = {}
    zipped = zip_networks(sources, wide(n), data=x, report=report)
    assert all(g["merges"] == 0 for g in report["groups"].values()) and not report["recalibrated"]
    with torch.no_grad():
        expected, got = _ensemble(sources, x), zipped(x)
    # measured: at most 3e-7 (outputs of order 1)
    assert (got - expected).abs().max() < 1e-5 * max(1.0, float(expected.abs().max()))
    # and on inputs it was not traced or correlated on
    x2 = _images(seed=1)
    with torch.no_grad():
        assert torch.allclose(zipped(x2), _ensemble(sources, x2), atol=1e-5)


def test_full_zip_of_a_network_and_its_shuffled_copy_is_the_network():
    a = _source(lambda: _resnet((8, 16, 16, 32)), 0)
    x = _images(32)
    spec = permutation_spec(a, x)
    g = torch.Generator().manual_seed(5)
    perms = {name: torch.randperm(size, generator=g) for name, size in spec.sizes.items()}
    b = _resnet((8, 16, 16, 32)).eval()
    b.load_state_dict(apply_permutation(spec, perms, a.state_dict()))
    report = {}
    zipped = zip_networks([a, b], _resnet((8, 16, 16, 32)), data=x, recalibrate=False, report=report)
    assert all(g["merges"] == g["width"] and g["largest_merge"] == 2 for g in report["groups"].values())
    with torch.no_grad():
        assert torch.allclose(zipped(x), a(x), atol=1e-5)
    zipped.load_state_dict(a.state_dict())  # a plain network of the sources' width


def test_full_zip_and_budget_zip_of_independent_sources():
    sources = [_source(lambda: _resnet((8, 16, 16, 32)), seed) for seed in (0, 1)]
    x = _images(32)
    report = {}
    one = zip_networks(sources, _resnet((8, 16, 16, 32)), data=x, report=report)
    assert report["recalibrated"] and report["groups"]["conv1"] == {
        "width": 8, "target_width": 8, "merges": 8, "largest_merge": 2
    }  # fmt: skip
    assert set(one.state_dict()) == set(sources[0].state_dict())
    budget = zip_networks(sources, _resnet((12, 24, 24, 48)), data=[(x[:16], None), (x[16:], None)])
    with torch.no_grad():
        for net in (one, budget):
            out = net(x)
            assert out.shape == (32, 4) and torch.isfinite(out).all()
    # the zipped statistics were recomputed on the data: every norm layer normalises it to zero mean
    stats = {}
    bn = budget.get_submodule("layer1.0.bn1")
    handle = bn.register_forward_pre_hook(lambda m, i: stats.update(mean=i[0].mean((0, 2, 3))))
    with torch.no_grad():
        budget(x)
    handle.remove()
    assert torch.allclose(stats["mean"], bn.running_mean, atol=1e-4)


def test_three_sources():
    sources = [_source(lambda: _densenet(8, 4), seed) for seed in range(3)]
    x = _images()
    report = {}
    zipped = zip_networks(sources, _densenet(8, 4), data=x, within_model=False, report=report)
    assert all(g["merges"] == 2 * g["width"] for g in report["groups"].values())
    with torch.no_grad():
        assert zipped(x).shape == (16, 3)


def test_structure_errors():
    small = [_source(lambda: _resnet((8, 16, 16, 32)), seed) for seed in (0, 1)]
    x = _images(4)
    with pytest.raises(ValueError, match=r"group 'conv1' is 4 channels wide in the target; with 2 sources of width 8 "
                       r"it must be between 8 and 16"):  # fmt: skip
        zip_networks(small, _resnet((4, 16, 16, 32)), data=x)
    with pytest.raises(ValueError, match=r"group 'layer4.0.conv1' is 72 channels wide .* between 32 and 64"):
        zip_networks(small, _resnet((8, 16, 16, 72)), data=x)
    with pytest.raises(ValueError, match="the target is a DenseNet; it must be a ResNet like the sources"):
        zip_networks(small, _densenet(8, 4), data=x)
    with pytest.raises(
        ValueError, match=r"structure differs from the sources': tensors only in the target \['layer1.1.bn1.bias'"
    ):
        zip_networks(small, _resnet((8, 16, 16, 32), layers=(2, 1, 1, 1)), data=x)
    with pytest.raises(ValueError, match="output channels differ: 4 in the sources, 5 in the target"):
        zip_networks(small, _resnet((8, 16, 16, 32), num_classes=5), data=x)
    with pytest.raises(ValueError, match=r"source 1 and source 0 differ in shape .*: conv1\.weight \(16, 1, "):
        zip_networks([small[0], _resnet((16, 16, 16, 32))], _resnet((16, 32, 32, 64)), data=x)
    with pytest.raises(ValueError, match="at least 2 sources, got 1"):
        zip_networks(small[:1], _resnet((8, 16, 16, 32)), data=x)
    with pytest.raises(UnsupportedOperationError, match="hidden channels that must stay in place"):
        zip_networks([TinyNet().eval(), TinyNet().eval()], TinyNet(), data=x)
    with pytest.raises(UnsupportedOperationError, match="processes the network's output channels further"):
        zip_networks([_unet((4, 8, 16), 1), _unet((4, 8, 16), 1)], _unet((4, 8, 16), 1), data=x)
    with pytest.raises(ValueError, match="data yielded no batch"):
        zip_networks(small, _resnet((8, 16, 16, 32)), data=[])


def test_zip_matrices_merge_the_most_correlated_features():
    # two sources of 3 features: source 1's features are source 0's in the order (2, 0, 1)
    corr = torch.eye(6) * 0.1
    for i, j in ((0, 4), (1, 5), (2, 3)):
        corr[i, j] = corr[j, i] = 0.9
    corr[0, 1] = corr[1, 0] = 0.95  # a strong within-source pair
    merge, unmerge = zip_matrices(corr, 2, 3, within_model=False)
    assert torch.equal(unmerge.argmax(1), torch.tensor([0, 1, 2, 2, 0, 1]))
    assert torch.allclose(merge @ unmerge, torch.eye(3)) and torch.allclose(merge.sum(1), torch.ones(3))
    merge, unmerge = zip_matrices(corr, 2, 5)  # within-source merges allowed: the strongest pair goes first
    assert unmerge[0].argmax() == unmerge[1].argmax() and torch.equal(unmerge.sum(0), torch.tensor([2.0, 1, 1, 1, 1]))
    merge, unmerge = zip_matrices(corr, 2, 6)
    assert torch.equal(merge, torch.eye(6)) and torch.equal(unmerge, torch.eye(6))
    # three sources down to one source's width: clusters of three, one feature per source where possible
    g = torch.Generator().manual_seed(0)
    c = torch.rand(12, 12, generator=g)
    merge, unmerge = zip_matrices((c + c.T) / 2, 3, 4, within_model=False)
    assert unmerge.sum(0).max() <= 5 and merge.shape == (4, 12) and torch.equal(unmerge.sum(1), torch.ones(12))
    with pytest.raises(ValueError, match="size must be between 1 and 6, got 7"):
        zip_matrices(corr, 2, 7)
    with pytest.raises(ValueError, match="correlation must be square"):
        zip_matrices(corr[:5], 2, 3)


def test_inference_macs_counts_convolutions_and_linear_layers():
    assert inference_macs(nn.Linear(10, 5), torch.randn(1, 10)) == 50
    conv = nn.Conv2d(2, 4, 3, padding=1)
    assert inference_macs(conv, torch.randn(1, 2, 8, 8)) == 4 * 2 * 9 * 64
    one = inference_macs(_resnet((8, 16, 16, 32)), _images(1))
    double = inference_macs(_resnet((16, 32, 32, 64)), _images(1))
    # twice the width: four times the hidden convolutions, twice the first conv and the head
    assert 3.5 * one < double < 4 * one
