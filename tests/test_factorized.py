"""LowRankLinear, parameter counts, module replacement and dense reconstruction."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from gfwsvd_core.factorized import LowRankLinear, parameter_count, replace_layer, to_dense
from gfwsvd_core.layers import get_weight
from tiny_models import tiny_gpt2


def _random_low_rank(m: int, n: int, r: int, bias: bool = True, seed: int = 0) -> LowRankLinear:
    torch.manual_seed(seed)
    lr = LowRankLinear(n, m, r, bias=bias)
    with torch.no_grad():
        if bias:
            lr.up.bias.normal_()
    return lr


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 7)])
def test_low_rank_equals_linear_with_product_weight(bias, shape):
    m, n, r = 6, 7, 3
    lr = _random_low_rank(m, n, r, bias=bias)
    dense = nn.Linear(n, m, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(lr.up.weight @ lr.down.weight)
        if bias:
            dense.bias.copy_(lr.up.bias)
    x = torch.randn(*shape)
    out = lr(x)
    assert out.shape == (*shape[:-1], m)
    torch.testing.assert_close(out, dense(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(lr.dense_weight(), dense.weight, atol=1e-6, rtol=0)
    assert lr.down.weight.shape == (r, n) and lr.up.weight.shape == (m, r)
    assert lr.down.bias is None
    assert (lr.in_features, lr.out_features, lr.rank, lr.dense_type) == (n, m, r, "linear")
    assert "rank=3" in repr(lr) and "dense_type='linear'" in repr(lr)


def test_constructor_validates():
    with pytest.raises(ValueError, match="dense_type"):
        LowRankLinear(4, 4, 2, dense_type="conv2d")
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 4, 0)
    lr = LowRankLinear(4, 5, 2, dtype=torch.float64)
    assert lr.up.weight.dtype == torch.float64 and lr.down.weight.dtype == torch.float64


def test_replacing_linear_copies_bias_dtype_and_checks_shapes():
    torch.manual_seed(1)
    dense = nn.Linear(8, 6).double()
    up, down = torch.randn(6, 2), torch.randn(2, 8)
    lr = LowRankLinear.replacing(dense, up, down)
    assert lr.up.weight.dtype == torch.float64 and lr.dense_type == "linear" and lr.rank == 2
    torch.testing.assert_close(lr.up.bias, dense.bias)
    torch.testing.assert_close(lr.dense_weight(), (up @ down).double())
    no_bias = LowRankLinear.replacing(nn.Linear(8, 6, bias=False), up, down)
    assert no_bias.up.bias is None
    with pytest.raises(ValueError, match="do not fit"):
        LowRankLinear.replacing(dense, down, up)
    with pytest.raises(TypeError):
        LowRankLinear.replacing(nn.Conv2d(1, 1, 1), up, down)


def test_replacing_conv1d_with_full_rank_svd_keeps_outputs():
    torch.manual_seed(2)
    conv = Conv1D(6, 5)  # nf=out=6, nx=in=5: weight stored 5 x 6
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    w = get_weight(conv)  # 6 x 5, nn.Linear layout
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    up, down = (u * s.sqrt()).float(), (s.sqrt()[:, None] * vh).float()
    lr = LowRankLinear.replacing(conv, up, down)
    assert lr.dense_type == "conv1d" and (lr.out_features, lr.in_features, lr.rank) == (6, 5, 5)
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(lr(x), conv(x), atol=1e-5, rtol=0)
    back = to_dense(lr)
    assert isinstance(back, Conv1D) and back.weight.shape == conv.weight.shape
    torch.testing.assert_close(back(x), conv(x), atol=1e-5, rtol=0)


def test_to_dense_linear():
    lr = _random_low_rank(4, 9, 2)
    back = to_dense(lr)
    assert type(back) is nn.Linear and back.weight.shape == (4, 9)
    x = torch.randn(3, 9)
    torch.testing.assert_close(back(x), lr(x), atol=1e-6, rtol=0)
    back = to_dense(_random_low_rank(4, 9, 2, bias=False))
    assert back.bias is None
    with pytest.raises(TypeError):
        to_dense(nn.Linear(2, 2))


def test_parameter_count():
    assert parameter_count(6, 4) == 6 * 4 + 6
    assert parameter_count(6, 4, bias=False) == 24
    assert parameter_count(6, 4, rank=2) == 2 * 10 + 6
    assert parameter_count(6, 4, rank=2, bias=False) == 20
    lr = LowRankLinear(4, 6, 2)
    assert sum(p.numel() for p in lr.parameters()) == parameter_count(6, 4, rank=2)


def test_replace_layer_dotted_names_and_errors():
    model = tiny_gpt2()
    name = "transformer.h.1.mlp.c_fc"  # ModuleList index inside the dotted name
    old = model.get_submodule(name)
    new = LowRankLinear(32, 128, 4, dense_type="conv1d")
    assert replace_layer(model, name, new) is old
    assert model.get_submodule(name) is new
    assert model.transformer.h[1].mlp.c_fc is new
    for bad in ("transformer.h.7.mlp.c_fc", "transformer.h.1.mlp.nope", "nope", ""):
        with pytest.raises((KeyError, ValueError)):
            replace_layer(model, bad, new)


def test_from_factors_matches_product_and_copies():
    torch.manual_seed(3)
    up, down, bias = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64), torch.randn(6)
    lr = LowRankLinear.from_factors(up, down, bias)
    assert (lr.out_features, lr.in_features, lr.rank, lr.dense_type) == (6, 5, 2, "linear")
    assert lr.up.weight.dtype == torch.float64  # dtype follows up unless given
    torch.testing.assert_close(lr.dense_weight(), up @ down, atol=1e-12, rtol=0)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(lr(x), x @ (up @ down).T + bias.double(), atol=1e-12, rtol=0)
    up.zero_()  # the layer holds copies
    assert lr.up.weight.abs().sum() > 0
    f32 = LowRankLinear.from_factors(torch.randn(6, 2), torch.randn(2, 5), dtype=torch.float32, dense_type="conv1d")
    assert f32.up.weight.dtype == torch.float32 and f32.up.bias is None and f32.dense_type == "conv1d"
    with pytest.raises(ValueError, match="inner dimensions"):
        LowRankLinear.from_factors(torch.randn(6, 2), torch.randn(3, 5))
    with pytest.raises(ValueError, match="bias"):
        LowRankLinear.from_factors(torch.randn(6, 2), torch.randn(2, 5), torch.randn(5))
    with pytest.raises(ValueError, match="matrices"):
        LowRankLinear.from_factors(torch.randn(6), torch.randn(2, 5))


def test_to_dense_follows_like():
    lr = _random_low_rank(4, 9, 2)  # dense_type "linear"
    x = torch.randn(2, 9)
    as_conv = to_dense(lr, like=Conv1D(4, 9))
    assert isinstance(as_conv, Conv1D) and as_conv.weight.shape == (9, 4)
    torch.testing.assert_close(as_conv(x), lr(x), atol=1e-6, rtol=0)
    lr.dense_type = "conv1d"
    as_linear = to_dense(lr, like=nn.Linear(9, 4))
    assert type(as_linear) is nn.Linear
    torch.testing.assert_close(as_linear(x), lr(x), atol=1e-6, rtol=0)
    no_bias = _random_low_rank(4, 9, 2, bias=False)
    conv = to_dense(no_bias, like=Conv1D(4, 9))  # Conv1D always has a bias: zero
    assert conv.bias.abs().sum() == 0
    torch.testing.assert_close(conv(x), no_bias(x), atol=1e-6, rtol=0)
