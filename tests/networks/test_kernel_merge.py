from __future__ import annotations

import functools

import pytest
import torch
from conftest import TinyNet, make_source
from monai.networks.nets import DenseNet121, DynUNet, SEResNet50, resnet18
from torch import nn

from monai_medmerge.merging import recalibrate_norm
from monai_medmerge.networks import KernelMerge, find_units
from monai_medmerge.networks.units import tied_parameters

# (constructor taking spatial_dims and num_classes, head name, input side for 2-D, input side for 3-D)
ARCHS = {
    "resnet18": (
        lambda spatial_dims, num_classes: resnet18(
            spatial_dims=spatial_dims, n_input_channels=1, num_classes=num_classes
        ),
        "fc",
        32,
        32,
    ),
    "densenet121": (
        lambda spatial_dims, num_classes: DenseNet121(
            spatial_dims=spatial_dims, in_channels=1, out_channels=num_classes
        ),
        "class_layers.out",
        32,
        32,
    ),
    "seresnet50": (
        lambda spatial_dims, num_classes: SEResNet50(spatial_dims=spatial_dims, in_channels=1, num_classes=num_classes),
        "last_linear",
        32,
        32,
    ),
    "tinynet": (lambda spatial_dims, num_classes: TinyNet(spatial_dims, 1, num_classes), "fc", 16, 8),
}


def _sources(arch: str, dims: int, classes=(3, 7), seed: int = 0) -> list[nn.Module]:
    ctor = ARCHS[arch][0]
    return [make_source(ctor, seed + 10 * i, spatial_dims=dims, num_classes=k) for i, k in enumerate(classes)]


def _input(arch: str, dims: int, batch: int = 4, seed: int = 0) -> torch.Tensor:
    side = ARCHS[arch][2 if dims == 2 else 3]
    return torch.randn((batch, 1) + (side,) * dims, generator=torch.Generator().manual_seed(seed))


def _naive_merge(
    sources: list[nn.Module], alpha: dict[str, torch.Tensor], merge: KernelMerge
) -> dict[str, torch.Tensor]:
    """Reference merge written independently of the library: loops over output channels, one tensor at a time."""
    out = {}
    params = [dict(s.named_parameters()) for s in sources]
    modules = dict(sources[0].named_modules())
    for unit in merge.units:
        a = alpha[unit.name].expand(-1, unit.channels)
        for full in unit.full_names():
            mod = modules[unit.module]
            stacked = torch.stack([p[full].detach() for p in params])  # (N, *shape)
            merged = torch.zeros_like(stacked[0])
            if unit.whole:
                merged = (a[:, 0].view(-1, *[1] * (stacked.dim() - 1)) * stacked).sum(0)
            elif isinstance(mod, nn.modules.conv._ConvTransposeNd) and stacked.dim() > 2:
                g = mod.groups
                cin_g, cout_g = mod.in_channels // g, mod.out_channels // g
                for i in range(mod.in_channels):
                    for j in range(cout_g):
                        c = (i // cin_g) * cout_g + j
                        merged[i, j] = sum(a[n, c] * stacked[n, i, j] for n in range(len(sources)))
            else:
                for c in range(stacked.shape[1]):
                    merged[c] = sum(a[n, c] * stacked[n, c] for n in range(len(sources)))
            out[full] = merged
    return out


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_equals_collapse(arch, dims):
    torch.manual_seed(0)
    sources = _sources(arch, dims)
    merge = KernelMerge(sources, head=ARCHS[arch][1], out_channels=5, anchor=1)
    with torch.no_grad():
        merge.merge_logits.normal_(0.0, 1.0)
    # norm statistics of the merged weights, as the workflow would set them
    recalibrate_norm(merge, [_input(arch, dims, seed=s) for s in range(2)])
    merge.eval()
    x = _input(arch, dims, seed=7)
    with torch.no_grad():
        expected = merge(x)
        plain = merge.collapse()
        got = plain(x)
    assert type(plain) is type(sources[0])
    assert not plain.training
    assert got.shape == (x.shape[0], 5)
    scale = expected.abs().max().item()
    assert scale > 0
    assert (got - expected).abs().max().item() <= 1e-5 * scale
    # the collapsed state dict has exactly the sources' keys, with the new head's shape
    keys = list(sources[0].state_dict())
    assert list(plain.state_dict()) == keys
    head_w = plain.get_submodule(ARCHS[arch][1]).weight
    assert head_w.shape[0] == 5


@pytest.mark.parametrize("granularity", ["kernel", "layer", "model"])
def test_collapse_matches_independent_reference(granularity):
    sources = _sources("tinynet", 2, classes=(3, 3, 3))
    merge = KernelMerge(sources, granularity=granularity)
    with torch.no_grad():
        merge.merge_logits.normal_(0.0, 1.0)
    reference = _naive_merge(sources, merge.coefficients(), merge)
    plain = merge.collapse()
    params = dict(plain.named_parameters())
    assert set(reference) == set(params)
    for name, value in reference.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # a coefficient that is not uniform must actually differ from the plain average somewhere
    average = {k: torch.stack([dict(s.named_parameters())[k] for s in sources]).mean(0) for k in reference}
    assert any(not torch.allclose(params[k], average[k], atol=1e-4) for k in reference)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_hot_collapse_is_source(index):
    sources = _sources("resnet18", 2, classes=(3, 7, 4))
    merge = KernelMerge(sources, head="fc", out_channels=5)
    one_hot = [0.0, 0.0, 0.0]
    one_hot[index] = 1.0
    merge.set_coefficients(one_hot)
    plain = merge.collapse()
    body = {k: v for k, v in plain.named_parameters() if not k.startswith("fc.")}
    source = dict(sources[index].named_parameters())
    assert len(body) == len(source) - 2
    for name, value in body.items():
        assert torch.equal(value, source[name]), name


def test_training_changes_only_coefficients_and_head():
    sources = _sources("tinynet", 2)
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in sources]
    merge = KernelMerge(sources, head="fc", out_channels=4, anchor=0)
    trainable = {n for n, p in merge.named_parameters() if p.requires_grad}
    assert trainable == {"merge_logits", "network.fc.weight", "network.fc.bias"}
    stacks = {k: v.clone() for k, v in merge.named_buffers() if "_stack" in k}
    logits0, head0 = merge.merge_logits.detach().clone(), merge.network.fc.weight.detach().clone()
    opt = torch.optim.Adam(merge.parameters(), lr=1e-2)
    merge.train()
    for step in range(3):
        x = _input("tinynet", 2, batch=8, seed=step)
        loss = nn.functional.cross_entropy(merge(x), torch.arange(8) % 4)
        opt.zero_grad()
        loss.backward()
        assert merge.merge_logits.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(merge.merge_logits, logits0)
    assert not torch.equal(merge.network.fc.weight, head0)
    for s, ref in zip(sources, before, strict=True):
        for k, v in s.state_dict().items():
            assert torch.equal(v, ref[k]), k
    for k, v in merge.named_buffers():
        if "_stack" in k:
            assert torch.equal(v, stacks[k]), k


def test_coefficient_counts_resnet18():
    # MONAI resnet18 without its head: conv1+bn1, 8 basic blocks of 2 conv+bn pairs, 3 downsample conv+bn pairs:
    # 40 units; their output channels add up to 2*64 + 4*(4*64) + 6*128+4*128 + 6*256+4*256 + 6*512+4*512 = 9600.
    sources = _sources("resnet18", 2, classes=(3, 7))
    counts = {
        g: KernelMerge(sources, head="fc", out_channels=5, granularity=g).merge_logits.numel()
        for g in ("kernel", "layer", "model")
    }
    assert counts == {"kernel": 2 * 9600, "layer": 2 * 40, "model": 2}
    merge = KernelMerge(sources, head="fc", out_channels=5)
    coefficients = merge.coefficients()
    assert len(coefficients) == 40
    assert coefficients["conv1"].shape == (2, 64) and coefficients["layer4.1.bn2"].shape == (2, 512)
    assert sum(c.shape[1] for c in coefficients.values()) == 9600
    layer = KernelMerge(sources, head="fc", out_channels=5, granularity="layer").coefficients()
    assert all(c.shape == (2, 1) for c in layer.values())
    # heads merged too: the head is a 41st unit with one coefficient per class
    same_heads = _sources("resnet18", 2, classes=(3, 3))
    merged_heads = KernelMerge(same_heads, granularity="kernel")
    assert merged_heads.merge_logits.numel() == 2 * (9600 + 3)
    assert merged_heads.coefficients()["fc"].shape == (2, 3)


def test_anchor_initial_coefficients():
    sources = _sources("tinynet", 2, classes=(3, 3, 3))
    for alpha in KernelMerge(sources, anchor=2, anchor_weight=0.8).coefficients().values():
        torch.testing.assert_close(alpha[:, 0], torch.tensor([0.1, 0.1, 0.8]))
    for alpha in KernelMerge(sources, anchor=1).coefficients().values():
        torch.testing.assert_close(alpha[:, 0], torch.tensor([0.05, 0.9, 0.05]))
    for alpha in KernelMerge(sources).coefficients().values():
        torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / 3))
    # the anchor's buffers are the merged network's buffers
    merge = KernelMerge(sources, anchor=2)
    torch.testing.assert_close(merge.network.features[1].running_mean, sources[2].features[1].running_mean)


def test_state_dict_round_trip_resumes():
    sources = _sources("tinynet", 2)
    merge = KernelMerge(sources, head="fc", out_channels=4, anchor=1)
    opt = torch.optim.Adam(merge.parameters(), lr=1e-2)
    merge.train()
    for step in range(2):
        loss = nn.functional.cross_entropy(merge(_input("tinynet", 2, 8, step)), torch.arange(8) % 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = merge.state_dict()
    assert "merge_logits" in state and not any("_stack" in k for k in state)
    torch.manual_seed(123)  # a different head initialisation, overwritten by the load
    resumed = KernelMerge(sources, head="fc", out_channels=4, anchor=1)
    resumed.load_state_dict(state)
    merge.eval()
    resumed.eval()
    x = _input("tinynet", 2, 4, 99)
    with torch.no_grad():
        assert torch.equal(merge(x), resumed(x))
    for k, v in merge.coefficients().items():
        assert torch.equal(v, resumed.coefficients()[k])


def test_heads_of_different_sizes_merge():
    sources = _sources("densenet121", 2, classes=(3, 7))
    merge = KernelMerge(sources, head="class_layers.out", out_channels=4)
    assert merge(_input("densenet121", 2)).shape == (4, 4)
    with pytest.raises(ValueError, match="class_layers.out.weight"):
        KernelMerge(sources)


def _bad(msg_pattern, *args, **kwargs):
    with pytest.raises(ValueError, match=msg_pattern):
        KernelMerge(*args, **kwargs)


def test_bad_sources_are_named():
    tiny = functools.partial(TinyNet, 2, 1)
    a, b = tiny(3), tiny(3)
    _bad("at least 2", [a])
    _bad("ResNet", [a, resnet18(spatial_dims=2, n_input_channels=1, num_classes=3)])
    extra = tiny(3)
    extra.extra = nn.Linear(2, 2)
    _bad("extra.weight", [a, extra])
    missing = tiny(3)
    missing.fc.bias = None
    _bad("fc.bias", [a, missing])
    wide = tiny(3)
    wide.fc = nn.Linear(16, 9)
    _bad("fc.weight", [a, wide])
    for bad_value in (float("nan"), float("inf")):
        broken = tiny(3)
        with torch.no_grad():
            broken.features[3].weight[0, 0, 0, 0] = bad_value
        _bad(r"source 1.*features\.3\.weight|features\.3\.weight.*source 1", [a, broken])
    _bad("'classifier'", [a, b], head="classifier", out_channels=2)
    _bad("without head", [a, b], out_channels=2)
    _bad("anchor", [a, b], anchor=5)
    _bad("anchor_weight", [a, b], anchor=0, anchor_weight=1.0)
    _bad("granularity|kernel", [a, b], granularity="channel")


def test_forward_runs_one_network():
    # one merged forward runs each conv of the template once, not once per source
    sources = _sources("tinynet", 2, classes=(3, 3, 3, 3))
    merge = KernelMerge(sources)
    calls = []
    for m in merge.network.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            m.register_forward_hook(lambda *_: calls.append(1))
    merge(_input("tinynet", 2))
    assert len(calls) == sum(isinstance(m, nn.modules.conv._ConvNd) for m in sources[0].modules())


def test_resume_onto_other_sources_is_refused():
    sources = _sources("tinynet", 2)
    state = KernelMerge(sources, head="fc", out_channels=4).state_dict()
    swapped = KernelMerge(sources[::-1], head="fc", out_channels=4)
    with pytest.raises(RuntimeError, match=r"other sources.*\[0, 1\]"):
        swapped.load_state_dict(state)
    other = KernelMerge([sources[0], _sources("tinynet", 2, seed=5)[1]], head="fc", out_channels=4)
    with pytest.raises(RuntimeError, match=r"source\(s\) \[1\] differ"):
        other.load_state_dict(state)


def test_head_sizes_must_agree_without_out_channels():
    sources = _sources("tinynet", 2, classes=(3, 7))
    with pytest.raises(ValueError, match=r"different sizes \[3, 7\]; give out_channels"):
        KernelMerge(sources, head="fc")
    same = KernelMerge(_sources("tinynet", 2, classes=(3, 3)), head="fc")
    assert same.network.fc.out_features == 3


def test_tied_weights_are_refused_by_name():
    def tied(seed):
        net = make_source(TinyNet, seed, spatial_dims=2, num_classes=3)
        net.extra = nn.Linear(16, 3)
        net.extra.weight = net.fc.weight  # one Parameter held by two different modules
        return net

    assert tied_parameters(tied(0)) == [("fc.weight", "extra.weight")]
    with pytest.raises(ValueError, match=r"source 0 \(TinyNet\) ties weights.*\(fc\.weight and extra\.weight\)"):
        KernelMerge([tied(0), tied(1)])
    # only the second source ties: it is named
    with pytest.raises(ValueError, match=r"source 1 .*fc\.weight and extra\.weight"):
        untied = make_source(TinyNet, 2, spatial_dims=2, num_classes=3)
        untied.extra = nn.Linear(16, 3)
        KernelMerge([untied, tied(1)])


class _SharedModule(nn.Module):
    """One conv reached under two attribute names, as DynUNet reaches its blocks: one module, not tied weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.again = self.conv
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.again(torch.relu(self.conv(x).mean(1, keepdim=True))).mean((2, 3)))


def test_module_under_two_names_is_one_unit():
    sources = [make_source(_SharedModule, seed) for seed in (0, 1)]
    assert tied_parameters(sources[0]) == []
    merge = KernelMerge(sources)
    assert [u.name for u in merge.units] == ["conv", "fc"]
    assert merge.merge_logits.shape == (2, 4 + 3)
    with torch.no_grad():
        merge.merge_logits.normal_()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = merge.eval()(x)
        plain = merge.collapse()
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)
    assert plain.again is plain.conv
    state = plain.state_dict()
    assert list(state) == list(sources[0].state_dict())
    assert torch.equal(state["again.weight"], state["conv.weight"])
    alpha = merge.coefficients()["conv"]
    reference = sum(alpha[i].view(-1, 1, 1, 1) * sources[i].conv.weight for i in range(2))
    torch.testing.assert_close(state["conv.weight"], reference)


def _dynunet(spatial_dims: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=num_classes,
        kernel_size=[3, 3, 3, 3],
        strides=[1, 2, 2, 2],
        upsample_kernel_size=[2, 2, 2],
        filters=[8, 16, 16, 32],
        deep_supervision=deep_supervision,
        deep_supr_num=2,
        res_block=True,
    )


@pytest.mark.parametrize("deep_supervision", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_dynunet_merge_equals_collapse(dims, deep_supervision):
    # DynUNet reaches every block twice (e.g. input_block and skip_layers.downsample): one unit each, merged once
    def source(seed):
        return make_source(_dynunet, seed, spatial_dims=dims, num_classes=3, deep_supervision=deep_supervision)

    sources = [source(0), source(10), source(20)]
    side = 16
    x = torch.randn((2, 1) + (side,) * dims, generator=torch.Generator().manual_seed(7))
    # a source that has run a training step keeps its deep-supervision outputs, with gradients; it still merges
    sources[0].train()(x).sum().backward()
    sources[0].eval()
    # this case keeps the sources' heads when deep supervision is on (head=None: every head merged); replacing the
    # output head together with the deep-supervision heads is tested in test_segmentation_heads.py
    head, classes = (None, 3) if deep_supervision else ("output_block.conv.conv", 4)
    merge = KernelMerge(sources, head=head, out_channels=None if head is None else classes, anchor=0)
    names = [u.name for u in merge.units]
    assert len(names) == len(set(names)) and not any(n.startswith("skip_layers") for n in names)
    heads = [n for n in names if n.startswith("deep_supervision_heads")]
    assert heads == (["deep_supervision_heads.0.conv.conv", "deep_supervision_heads.1.conv.conv"] * deep_supervision)
    unique = {id(p): p for p in sources[0].parameters()}
    head_size = 0 if head is None else sum(p.numel() for p in sources[0].get_submodule(head).parameters())
    assert sum(merge._shapes[k].numel() for k in merge._shapes) == sum(p.numel() for p in unique.values()) - head_size

    with torch.no_grad():
        merge.merge_logits.normal_(0.0, 1.0)
    # a training step first: DynUNet then holds its deep-supervision outputs, with gradients, and collapse copes
    merge.train()
    out = merge(x)
    assert out.shape == ((2, 3, 3) if deep_supervision else (2, classes)) + (side,) * dims
    out.square().mean().backward()
    assert merge.merge_logits.grad.abs().sum() > 0
    merge.eval()
    with torch.no_grad():
        expected = merge(x)
        plain = merge.collapse()
        got = plain(x)
    assert type(plain) is DynUNet and not plain.training
    assert got.shape == (2, classes) + (side,) * dims
    scale = expected.abs().max().item()
    assert scale > 0
    assert (got - expected).abs().max().item() <= 1e-5 * scale
    if deep_supervision:  # the heads, merged as units, give the same training-mode outputs (instance norm: no stats)
        with torch.no_grad():
            torch.testing.assert_close(plain.train()(x), merge.train()(x), rtol=1e-5, atol=1e-5 * scale)
        plain.eval()

    # the collapsed state dict covers every name of the sources', aliases with identical values
    state = plain.state_dict()
    assert list(state) == list(sources[0].state_dict())
    aliases = [("input_block.conv1.conv.weight", "skip_layers.downsample.conv1.conv.weight")]
    if deep_supervision:
        aliases.append(
            ("deep_supervision_heads.0.conv.conv.weight", "skip_layers.next_layer.super_head.conv.conv.weight")
        )
    for a, b in aliases:
        assert torch.equal(state[a], state[b]), (a, b)
    # and loads strictly into a fresh DynUNet of the target's classes, which then computes the same outputs
    fresh = _dynunet(dims, classes, deep_supervision).eval()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), got, rtol=0, atol=0)


def test_head_reached_under_two_names_is_excluded_under_both():
    net = _dynunet(2, 3, deep_supervision=True)
    units = find_units(net, exclude="skip_layers.next_layer.next_layer.super_head")
    names = [u.name for u in units]
    assert "deep_supervision_heads.1.conv.conv" not in names
    assert "deep_supervision_heads.0.conv.conv" in names
    with pytest.raises(ValueError, match="exclude 'nowhere' is not a module of DynUNet"):
        find_units(net, exclude="nowhere")


def test_weighted_sum_gradient():
    from monai_medmerge.networks.kernel_merge import _WeightedSum

    a = torch.rand(3, 5, 1, dtype=torch.float64, requires_grad=True)
    stack = torch.randn(3, 5, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w: _WeightedSum.apply(w, stack), (a,))


@pytest.mark.parametrize("granularity", ["kernel", "layer"])
def test_coefficient_gradients_match_plain_autograd(granularity):
    # the same loss through a merge written with plain autograd ops must give the same coefficient gradients
    sources = _sources("tinynet", 2, classes=(3, 3, 3))
    merge = KernelMerge(sources, granularity=granularity).train()
    with torch.no_grad():
        merge.merge_logits.normal_()
    x, y = _input("tinynet", 2, batch=6, seed=3), torch.arange(6) % 3
    torch.manual_seed(0)  # the same dropout mask in both runs
    nn.functional.cross_entropy(merge(x), y).backward()

    logits = merge.merge_logits.detach().clone().requires_grad_(True)
    alpha = torch.softmax(logits, 0)
    params = [dict(s.named_parameters()) for s in sources]
    merged = {}
    for unit, sl in zip(merge.units, merge._slices(), strict=True):
        a = alpha[:, sl].expand(-1, unit.channels)
        for full in unit.full_names():
            stacked = torch.stack([p[full].detach() for p in params])
            if unit.transposed_groups and stacked.dim() > 2:
                g, cin = unit.transposed_groups, stacked.shape[1]
                # (N, C_in, C_out/g, ...): channel of [i, j] is (i // (C_in/g)) * C_out/g + j
                idx = torch.arange(cin)[:, None] // (cin // g) * stacked.shape[2] + torch.arange(stacked.shape[2])
                w = a[:, idx]
            else:
                w = a
            w = w.reshape(*w.shape, *[1] * (stacked.dim() - w.dim()))
            merged[full] = (w * stacked).sum(0)
    template = KernelMerge(sources, granularity=granularity).train().network
    for name, value in merged.items():
        mod_name, _, local = name.rpartition(".")
        template.get_submodule(mod_name).__dict__[local] = value
    torch.manual_seed(0)
    nn.functional.cross_entropy(template(x), y).backward()
    torch.testing.assert_close(merge.merge_logits.grad, logits.grad, rtol=1e-4, atol=1e-6)
    assert logits.grad.abs().sum() > 0
