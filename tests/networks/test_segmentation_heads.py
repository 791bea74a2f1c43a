"""Segmentation heads: find_head on MONAI's segmentation networks, and KernelMerge with a new head for a target."""

from __future__ import annotations

import pytest
import torch
from conftest import make_source
from monai.networks.nets import AttentionUnet, BasicUNet, DynUNet, HighResNet, SegResNet, SegResNetDS, SwinUNETR, UNet
from torch import nn

from monai_medmerge.networks import KernelMerge, find_head, replace_head


def _unet(spatial_dims: int, out_channels: int) -> nn.Module:
    # no residual units: the top up layer is one transposed convolution straight to the classes
    return UNet(spatial_dims, 1, out_channels, channels=(4, 8, 16), strides=(2, 2))


def _unet_res(spatial_dims: int, out_channels: int) -> nn.Module:
    # residual units and batch norm: the top up layer is a transposed conv + norm to the classes, then a residual
    # unit on the classes; the head is the whole block
    return UNet(spatial_dims, 1, out_channels, channels=(4, 8, 16), strides=(2, 2), num_res_units=2, norm="batch")


def _segresnet(spatial_dims: int, out_channels: int) -> nn.Module:
    return SegResNet(
        spatial_dims, init_filters=8, in_channels=1, out_channels=out_channels, blocks_down=(1, 1, 1), blocks_up=(1, 1)
    )


def _segresnet_ds(spatial_dims: int, out_channels: int) -> nn.Module:
    # dsdepth=2: the last two decoder levels have a head each; in training mode both outputs are returned
    return SegResNetDS(
        spatial_dims, init_filters=8, in_channels=1, out_channels=out_channels, blocks_down=(1, 1, 1), dsdepth=2
    )


def _attention_unet(spatial_dims: int, out_channels: int) -> nn.Module:
    return AttentionUnet(spatial_dims, 1, out_channels, channels=(4, 8, 16), strides=(2, 2))


def _highresnet(spatial_dims: int, out_channels: int) -> nn.Module:
    # the last block is a 1x1 conv to the classes followed by a batch norm on the classes
    return HighResNet(spatial_dims, 1, out_channels)


def _basicunet(spatial_dims: int, out_channels: int) -> nn.Module:
    return BasicUNet(spatial_dims, 1, out_channels, features=(4, 4, 8, 8, 16, 4))


def _dynunet(spatial_dims: int, out_channels: int, deep_supervision: bool = False) -> nn.Module:
    return DynUNet(
        spatial_dims,
        1,
        out_channels,
        kernel_size=[3, 3, 3],
        strides=[1, 2, 2],
        upsample_kernel_size=[2, 2],
        filters=[4, 8, 16],
        deep_supervision=deep_supervision,
        deep_supr_num=1,
    )


def _dynunet_ds(spatial_dims: int, out_channels: int) -> nn.Module:
    return _dynunet(spatial_dims, out_channels, deep_supervision=True)


def _swinunetr(spatial_dims: int, out_channels: int) -> nn.Module:
    pytest.importorskip("einops")  # SwinUNETR's forward needs it
    return SwinUNETR(
        in_channels=1,
        out_channels=out_channels,
        feature_size=12,
        spatial_dims=spatial_dims,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
    )


# constructor (spatial_dims, out_channels), the head find_head must name, input side (a multiple of the downsampling)
ARCHS = {
    "unet": (_unet, "model.2.conv", 16),
    "unet_res": (_unet_res, "model.2", 16),
    "segresnet": (_segresnet, "conv_final.2.conv", 16),
    "segresnet_ds": (_segresnet_ds, "up_layers.1.head", 16),
    "basicunet": (_basicunet, "final_conv", 32),
    "dynunet": (_dynunet, "output_block.conv.conv", 16),
    "dynunet_ds": (_dynunet_ds, "output_block.conv.conv", 16),
    "attention_unet": (_attention_unet, "model.2.conv", 16),
    "highresnet": (_highresnet, "blocks.11", 16),
    # SwinUNETR's deepest level is 1/32 of the input and instance-normalised: it must keep more than one voxel
    "swinunetr": (_swinunetr, "out.conv.conv", 64),
}
# the deep-supervision heads replaced with the head
DEEP_HEADS = {"dynunet_ds": ("deep_supervision_heads.0",), "segresnet_ds": ("up_layers.0.head",)}
# (architecture, spatial dims): 3-D where a tiny network runs in well under a second
CASES = [(a, 2) for a in ARCHS] + [("unet", 3), ("segresnet", 3), ("dynunet_ds", 3)]


def _sources(arch: str, dims: int, classes=(2, 4)) -> list[nn.Module]:
    ctor = ARCHS[arch][0]
    return [make_source(ctor, 10 * i, spatial_dims=dims, out_channels=k) for i, k in enumerate(classes)]


def _input(arch: str, dims: int, seed: int = 0) -> torch.Tensor:
    side = ARCHS[arch][2]
    return torch.randn((2, 1) + (side,) * dims, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,dims", CASES)
def test_find_head_names_the_output_layer(arch, dims):
    net = make_source(ARCHS[arch][0], 0, spatial_dims=dims, out_channels=2)
    assert find_head(net) == ARCHS[arch][1]
    # a given input gives the same answer
    assert find_head(net, example_input=_input(arch, dims)) == ARCHS[arch][1]


# the head by name in 2-D, found with "auto" in 2-D and 3-D
@pytest.mark.parametrize("arch,dims,head", [(a, d, "auto") for a, d in CASES] + [(a, 2, "named") for a in ARCHS])
def test_merge_with_new_head(arch, dims, head):
    ctor, name, _ = ARCHS[arch]
    sources = _sources(arch, dims)  # 2 and 4 source classes: the heads differ in shape, everything else agrees
    merge = KernelMerge(sources, head=name if head == "named" else "auto", out_channels=3, anchor=0)
    assert merge.head == name
    assert merge.heads == (name,) + DEEP_HEADS.get(arch, ())

    # the new head is trainable and not merged: none of its tensors is a merged one
    head_params = {
        f"network.{h}.{p}" for h in merge.heads for p, _ in merge.network.get_submodule(h).named_parameters()
    }
    assert head_params and head_params <= dict(merge.named_parameters()).keys()
    assert not any(k.startswith(merge.heads) for k in merge._shapes)
    assert not any(u.name.startswith(merge.heads) for u in merge.units)

    with torch.no_grad():
        merge.merge_logits.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    x = _input(arch, dims)
    spatial = tuple(x.shape[2:])

    merge.train()
    out = merge(x)
    # in training mode DynUNet stacks the deep-supervision outputs with the head's; SegResNetDS lists them
    if arch == "dynunet_ds":
        assert out.shape == (2, 2, 3) + spatial
    elif arch == "segresnet_ds":
        assert [o.shape[:2] for o in out] == [(2, 3), (2, 3)] and out[0].shape[2:] == spatial
        out = torch.cat([o.flatten() for o in out])
    else:
        assert out.shape == (2, 3) + spatial
    out.square().mean().backward()
    assert merge.merge_logits.grad.abs().sum() > 0
    assert all(
        merge.network.get_submodule(h).get_parameter(_weight(merge, h)).grad.abs().sum() > 0 for h in merge.heads
    )

    merge.eval()
    with torch.no_grad():
        expected = merge(x)
        plain = merge.collapse()
        got = plain(x)
    assert type(plain) is type(sources[0]) and not plain.training
    assert got.shape == (2, 3) + spatial
    scale = expected.abs().max().item()
    assert scale > 0
    assert (got - expected).abs().max().item() <= 1e-5 * scale

    # a plain instance of the class built for 3 classes takes the collapsed weights as they are
    fresh = ctor(spatial_dims=dims, out_channels=3)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), got, rtol=0.0, atol=0.0)


def _weight(merge: KernelMerge, head: str) -> str:
    """Name of the weight of the last layer in ``head``, relative to it."""
    names = [n for n, _ in merge.network.get_submodule(head).named_parameters() if n.endswith("weight")]
    return names[-1]


@pytest.mark.parametrize("dims", [2, 3])
def test_dynunet_deep_supervision_heads_take_the_target_classes(dims):
    # equal source classes: the deep-supervision heads could be merged as units, but they are replaced all the same
    sources = _sources("dynunet_ds", dims, classes=(2, 2))
    merge = KernelMerge(sources, head="auto", out_channels=3)
    x = _input("dynunet_ds", dims)
    plain = merge.collapse()
    # both names of the deep-supervision head hold the new head (DynUNet reaches it through a skip layer too)
    ds = plain.deep_supervision_heads[0]
    assert plain.skip_layers.next_layer.super_head is ds
    assert ds.conv.conv.out_channels == 3
    # in training mode the merged and the collapsed network stack 1 + 1 outputs of 3 classes, and agree
    # (instance norm keeps no statistics, so training mode is deterministic)
    with torch.no_grad():
        torch.testing.assert_close(plain.train()(x), merge.train()(x), rtol=1e-5, atol=1e-6)
    assert plain(x).shape == (2, 2, 3) + tuple(x.shape[2:])
    fresh = _dynunet_ds(dims, 3)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    # out_channels=None keeps the class count, and the heads are still fresh, not merged
    same = KernelMerge(sources, head="auto")
    assert same.heads == ("output_block.conv.conv", "deep_supervision_heads.0")
    assert not any(u.name.startswith("deep_supervision_heads") for u in same.units)


def test_replace_head_alone_resizes_every_class_layer():
    # what the paper recipe's phase 0 does to each source: a new head, no merge
    net = _dynunet_ds(2, 2)
    assert replace_head(net, "auto", 5) == ["output_block.conv.conv", "deep_supervision_heads.0"]
    x = _input("dynunet_ds", 2)
    assert net.train()(x).shape == (2, 2, 5, 16, 16)
    _dynunet_ds(2, 5).load_state_dict(net.state_dict(), strict=True)
    # a block head: every layer after the block's input side takes the new class count, the input side keeps its own
    unet = _unet_res(2, 2)
    assert replace_head(unet, "model.2", 5) == ["model.2"]
    assert unet.model[2][0].conv.in_channels == 8  # the block's input: the skip concatenation, unchanged
    _unet_res(2, 5).load_state_dict(unet.state_dict(), strict=True)
    assert unet.eval()(x).shape == (2, 5, 16, 16)


def test_replacing_only_the_last_layer_of_a_block_head_breaks_it():
    # why find_head names the whole block for UNet with residual units: the residual unit adds its input (the
    # transposed conv's class channels) to its output, so a new class count must reach both
    unet = _unet_res(2, 2)
    replace_head(unet, "model.2.1.conv.unit0.conv", 5)
    with pytest.raises(RuntimeError):
        unet.eval()(_input("unet_res", 2))


class _Pooled(nn.Module):
    """A network whose output is computed after its last conv: no layer produces the output's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


class _Upsampled(nn.Module):
    """A head at half resolution followed by upsampling, as in DeepLab-style networks."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.classes = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.classes(self.body(x)), scale_factor=2.0)


class _FixedSize(nn.Module):
    """A network that runs on 48-pixel inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 48:
            raise RuntimeError(f"expected 48 pixels, got {x.shape[-1]}")
        return self.out(x)


def test_find_head_errors_name_the_network_and_the_candidates():
    with pytest.raises(ValueError, match=r"_Pooled.*\(1, 4\).*conv \(Conv2d\) -> \(1, 4, 64, 64\)"):
        find_head(_Pooled())
    with pytest.raises(ValueError, match=r"_Pooled.*conv \(Conv2d\)"):
        KernelMerge([_Pooled(), _Pooled()], head="auto", out_channels=2)
    with pytest.raises(ValueError, match=r"could not run _FixedSize.*expected 48 pixels.*pass example_input"):
        find_head(_FixedSize())
    assert find_head(_FixedSize(), example_input=torch.zeros(1, 1, 48, 48)) == "out"
    merge = KernelMerge(
        [_FixedSize(), _FixedSize()], head="auto", out_channels=4, example_input=torch.zeros(1, 1, 4, 48)
    )
    assert merge.head == "out" and merge.network.out.out_channels == 4


class _LateAuxiliary(nn.Module):
    """An auxiliary output at half resolution, computed after the head, with as many channels as the output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 3, 1)
        self.aux = nn.Conv2d(8, 3, 1, stride=2)
        self.aux_output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        y = self.out(h)
        self.aux_output = self.aux(h)
        return y


def test_find_head_accepts_a_head_followed_by_resizing():
    assert find_head(_Upsampled()) == "classes"
    # the spatial size decides between layers with the output's channel count, not the call order alone
    assert find_head(_LateAuxiliary()) == "out"


def test_find_head_restores_training_modes():
    net = _unet_res(2, 2).train()
    net.model[0].eval()  # a mixed state must come back as it was
    find_head(net)
    assert net.training and not net.model[0].training
    assert all(m.training for m in net.model[1].modules())


def test_merge_methods_resolve_auto_with_the_callers_example_input():
    # UNETR-like networks need a fixed input size: the registry's build must pass the caller's example input on
    from monai.networks.nets import BasicUNet

    from monai_medmerge.merging import get_method

    sources = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sources.append(BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 8, 4)).eval())
    x = torch.randn(1, 1, 32, 32)
    merge = get_method("kernel", anchor=0).build(sources, head="auto", out_channels=3, example_input=x)
    assert merge.eval()(x).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="BasicUNet"):
        # an input the network cannot take: the error comes from find_head, which names the network
        get_method("kernel", anchor=0).build(sources, head="auto", out_channels=3, example_input=torch.randn(1, 2, 32))
