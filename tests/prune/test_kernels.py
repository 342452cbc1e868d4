"""The pruning kernels as pure functions: exact sparsity, N:M structure, and the ordering the papers
report on a layer-reconstruction problem: SparseGPT < Wanda < magnitude in output error."""
import pytest
import torch

from birdbone_core.prune.magnitude import magnitude_prune
from birdbone_core.prune.masks import nm_mask, unstructured_mask
from birdbone_core.prune.sparsegpt import sparsegpt_prune
from birdbone_core.prune.wanda import wanda_prune


def _problem(d_out=64, d_in=256, n=2048, seed=0):
    """A linear layer fed correlated inputs whose channels differ in loudness (as LLM activations do)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    scale = torch.exp(torch.randn(d_in, generator=g))          # per-channel loudness, log-normal
    X = (torch.randn(n, d_in, generator=g) @ mix) * scale       # [n_tokens, d_in]
    H = 2 * X.T @ X / n
    return W, X, H


def _out_err(W, Wp, X):
    return ((X @ (W - Wp).T) ** 2).sum().item() / ((X @ W.T) ** 2).sum().item()


@pytest.mark.parametrize("per_row", [True, False])
def test_unstructured_mask_exact_count(per_row):
    s = torch.rand(16, 100)
    keep = unstructured_mask(s, 0.3, per_row)
    if per_row:
        assert (keep.sum(1) == 70).all()
    else:
        assert int((~keep).sum()) == int(1600 * 0.3)
    # the dropped entries are the lowest scores (of each row, or of the whole matrix)
    if per_row:
        dropped_max = torch.where(keep, -torch.inf, s).max(1).values
        kept_min = torch.where(keep, s, torch.inf).min(1).values
        assert (dropped_max <= kept_min).all()
    else:
        assert s[~keep].max() <= s[keep].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_structure(n, m):
    s = torch.rand(8, 64)
    keep = nm_mask(s, n, m)
    groups = keep.reshape(8, 64 // m, m)
    assert (groups.sum(-1) == m - n).all()


def test_nm_mask_rejects_bad_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.rand(2, 10), 2, 4)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_kernels_hit_target_and_zero_pruned(nm):
    W, X, H = _problem()
    for Wp, keep in (
        magnitude_prune(W, 0.5, nm),
        wanda_prune(W, X.norm(dim=0), 0.5, nm),
        sparsegpt_prune(W, H, 0.5, nm, blocksize=64),
    ):
        assert Wp.shape == W.shape and keep.dtype == torch.bool
        assert (Wp[~keep] == 0).all()
        assert abs((~keep).float().mean().item() - 0.5) < 1e-6
        if nm:
            assert (keep.reshape(W.shape[0], -1, 4).sum(-1) == 2).all()


def test_magnitude_and_wanda_leave_survivors_untouched():
    W, X, _ = _problem()
    for Wp, keep in (magnitude_prune(W, 0.5), wanda_prune(W, X.norm(dim=0), 0.5)):
        assert torch.equal(Wp[keep], W[keep])


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_error_ordering_sparsegpt_wanda_magnitude(nm):
    W, X, H = _problem()
    e_mag = _out_err(W, magnitude_prune(W, 0.5, nm)[0], X)
    e_wanda = _out_err(W, wanda_prune(W, X.norm(dim=0), 0.5, nm)[0], X)
    e_sgpt = _out_err(W, sparsegpt_prune(W, H, 0.5, nm)[0], X)
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)


def test_sparsegpt_zero_sparsity_is_identity_and_dead_inputs_zeroed():
    W, X, H = _problem(d_in=128)
    Wp, keep = sparsegpt_prune(W, H, 0.0)
    assert keep.all() and torch.allclose(Wp, W, atol=1e-4)
    X[:, 5] = 0
    H = 2 * X.T @ X / X.shape[0]
    Wp, _ = sparsegpt_prune(W, H, 0.25)
    assert (Wp[:, 5] == 0).all()


def test_shape_errors():
    W, X, H = _problem()
    with pytest.raises(ValueError, match="does not match"):
        sparsegpt_prune(W, H[:10, :10], 0.5)
    with pytest.raises(ValueError, match="does not match"):
        wanda_prune(W, torch.ones(3), 0.5)
