"""PSD roots: relative damping, reported values, visible fallback."""

import pytest
import torch

from gfwsvd_core.fisher.psd import root


def test_pd_matrix_needs_no_damping_and_root_is_exact():
    M = torch.randn(5, 5, dtype=torch.float64)
    M = M @ M.T + torch.eye(5, dtype=torch.float64)
    r = root(M)
    assert r.damping == 0 and not r.fell_back
    assert torch.allclose(r.L @ r.L.T, M, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e6])
def test_damping_is_relative_to_scale(scale):
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    M = scale * (x @ x.T)  # rank 2: singular
    r = root(M)
    assert 0 < r.damping <= 1e-6  # the same relative level whatever the scale
    assert not r.fell_back
    LLt = r.L @ r.L.T
    assert torch.allclose(LLt, M + r.damping * torch.trace(M) / 6 * torch.eye(6, dtype=torch.float64), rtol=1e-8, atol=1e-12 * scale)


def test_zero_factor_falls_back_to_identity_visibly():
    r = root(torch.zeros(4, 4))
    assert r.fell_back and r.zero and torch.equal(r.L, torch.eye(4, dtype=torch.float64))
    assert r.warnings("input-side") == [
        "the input-side weight is zero: this layer's output does not change the loss on the calibration data"]


def test_damping_escalation_is_a_warning():
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = root(x @ x.T, damping=0.0)
    assert r.damping > 0 and r.requested == 0.0
    assert r.warnings("output-side") == [
        f"the output-side weight's damping was raised from 0 to {r.damping:g} (its Cholesky factorisation failed)"]
    assert root(torch.eye(3), damping=1e-6).warnings("x") == []


def test_indefinite_is_an_error_and_negative_trace_too():
    with pytest.raises(ValueError, match="not positive semi-definite"):
        root(torch.diag(torch.tensor([1.0, -1.0])))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        root(-torch.eye(3))  # the negated PSD pair an unfixed Lanczos would return


def test_diagonal_weights():
    r = root(torch.tensor([4.0, 0.0, 1.0]))
    assert r.diagonal and r.damping > 0 and torch.all(r.L > 0)
    assert torch.allclose(r.L[[0, 2]], torch.tensor([2.0, 1.0], dtype=torch.float64), rtol=1e-3)
    with pytest.raises(ValueError, match="negative"):
        root(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="damping"):
        root(torch.eye(2), damping=-1)
