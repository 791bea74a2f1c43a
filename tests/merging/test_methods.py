from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, make_source

from monai_medmerge.merging import METHODS, MergeMethod, get_method, list_methods, register_method
from monai_medmerge.networks import KernelMerge


def _sources(n=2, classes=3):
    return [make_source(TinyNet, 100 + i, spatial_dims=2, num_classes=classes) for i in range(n)]


def test_registry_lists_the_documented_methods():
    assert {"average", "interpolate", "model", "layer", "kernel"} <= set(METHODS)
    records = {r["name"]: r for r in list_methods()}
    assert records["kernel"]["learned"] is True and records["average"]["learned"] is False
    assert records["kernel"]["reference"].startswith("https://arxiv.org/abs/2403.11646")
    assert records["kernel"]["parameters"]["anchor"]["default"] is None
    assert set(records["interpolate"]["parameters"]) == {"t", "weights", "align", "matching"}
    assert all(r["parameters"]["matching"]["default"] == "weights" for r in records.values())
    assert all(r["parameters"]["align"]["default"] is False for r in records.values())


def test_unknown_method_and_setting():
    with pytest.raises(ValueError, match="unknown merge method 'ties'.*average"):
        get_method("ties")
    with pytest.raises(ValueError, match="no setting.*'lr'"):
        get_method("kernel", lr=0.1)
    with pytest.raises(ValueError, match="exactly one of t or weights"):
        get_method("interpolate")


def test_average_is_the_mean_of_the_sources():
    sources = _sources(3)
    plain = get_method("average").merge(sources)
    for name, value in plain.named_parameters():
        mean = torch.stack([dict(s.named_parameters())[name] for s in sources]).mean(0)
        torch.testing.assert_close(value, mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.25, 1.0])
def test_interpolate_t(t):
    a, b = _sources(2)
    plain = get_method("interpolate", t=t).merge([a, b])
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for name, value in plain.named_parameters():
        torch.testing.assert_close(value, (1 - t) * pa[name] + t * pb[name], rtol=1e-5, atol=1e-6)


def test_interpolate_weights_checked():
    sources = _sources(3)
    with pytest.raises(ValueError, match="t is for two sources"):
        get_method("interpolate", t=0.5).merge(sources)
    with pytest.raises(ValueError, match="sum to 1"):
        get_method("interpolate", weights=[0.5, 0.5, 0.5]).merge(sources)


@pytest.mark.parametrize("name,granularity", [("model", "model"), ("layer", "layer"), ("kernel", "kernel")])
def test_learned_methods_build_trainable_merges(name, granularity):
    sources = _sources(2)
    method = get_method(name, anchor=1, anchor_weight=0.7)
    merge = method.build(sources, head="fc", out_channels=4)
    assert isinstance(merge, KernelMerge) and merge.granularity == granularity
    assert merge.merge_logits.requires_grad
    alpha = next(iter(merge.coefficients().values()))
    torch.testing.assert_close(alpha[:, 0], torch.tensor([0.3, 0.7]))
    with pytest.raises(ValueError, match="learns its coefficients"):
        method.merge(sources)


def test_fixed_methods_do_not_train():
    merge = get_method("average").build(_sources(2), head="fc", out_channels=4)
    assert not merge.merge_logits.requires_grad


def test_register_a_new_method_in_one_class():
    @register_method
    class FirstSource(MergeMethod):
        name = "first-source-test"
        pretty_name = "First source"
        reference = "https://example.org"

        def _build(self, sources, head, out_channels):
            merge = KernelMerge(sources, head=head, out_channels=out_channels, granularity="model")
            merge.set_coefficients([1.0] + [0.0] * (len(sources) - 1))
            return merge

    try:
        sources = _sources(2)
        plain = get_method("first-source-test").merge(sources)
        for name, value in plain.named_parameters():
            assert torch.equal(value, dict(sources[0].named_parameters())[name])
        with pytest.raises(ValueError, match="already registered"):

            @register_method
            class Clash(FirstSource):
                pass

    finally:
        METHODS.pop("first-source-test", None)
