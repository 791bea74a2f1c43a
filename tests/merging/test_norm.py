from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, make_source
from torch import nn

from monai_medmerge.merging import recalibrate_norm
from monai_medmerge.networks import KernelMerge


def test_statistics_are_the_cumulative_average_of_the_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.9), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    net[1].running_mean.fill_(5.0)
    batches = [torch.randn(6, 1, 8, 8) * 2 + 1 for _ in range(4)]
    net.train()
    net[2].eval()  # a mixed state that must be restored
    momentum = net[1].momentum
    recalibrate_norm(net, [(b, 0) for b in batches])
    feats = [net[0](b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, var.detach(), rtol=1e-4, atol=1e-5)
    assert int(net[1].num_batches_tracked) == 4
    # the second norm saw dropout in eval mode: its statistics are those of the deterministic path
    with torch.no_grad():
        second = [
            net[3](nn.functional.batch_norm(f, net[1].running_mean, net[1].running_var, net[1].weight, net[1].bias))
            for f in feats
        ]
    torch.testing.assert_close(
        net[4].running_mean, torch.stack([s.mean((0, 2, 3)) for s in second]).mean(0), rtol=1e-4, atol=1e-5
    )
    assert net.training and net[1].training and not net[2].training
    assert net[1].momentum == momentum


def test_dict_batches_and_kernel_merge():
    sources = [make_source(TinyNet, i, spatial_dims=2, num_classes=3) for i in range(2)]
    merge = KernelMerge(sources, head="fc", out_channels=2)
    bn = merge.network.features[1]
    before = bn.running_mean.clone()
    loader = [{"image": torch.randn(4, 1, 16, 16), "label": torch.zeros(4)} for _ in range(3)]
    recalibrate_norm(merge, loader)
    assert not torch.allclose(bn.running_mean, before)
    assert int(bn.num_batches_tracked) == 3
    with pytest.raises(ValueError, match="no key 'img'"):
        recalibrate_norm(merge, loader, input_key="img")
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_norm(merge, [])
