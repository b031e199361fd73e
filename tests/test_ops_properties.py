"""Property-based tests of the token ops: for random shapes, dtypes and keep ratios, the gather keeps
exactly k + prefix tokens (the top-k, unique, in range, prefix first and intact), the masked softmax
gives rows that sum to 1 and (near) zero weight to dropped keys, and hard decisions never revive a
dropped token."""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dynamicvit.core.settings import keep_counts  # noqa: E402
from dynamicvit.core.ops import masked_softmax, sample_keep, select_tokens  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FAST = settings(max_examples=60, deadline=None)


@st.composite
def token_batches(draw):
    """(x (B, P + N, C), score (B, N), P, keep ratio, seed) with random sizes and dtype."""
    B = draw(st.integers(1, 4))
    P = draw(st.integers(0, 3))
    N = draw(st.integers(1, 64))
    C = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(DTYPES))
    rho = draw(st.floats(0.01, 1.0))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, P + N, C, generator=g).to(dtype)
    score = torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype)
    return x, score, P, rho


@FAST
@given(token_batches())
def test_gather_keeps_exactly_k_plus_prefix_tokens_the_top_k(batch):
    x, score, P, rho = batch
    B, N = score.shape
    k = max(1, int(N * rho))
    out, keep = select_tokens(x, score, k, P)
    assert out.shape == (B, P + k, x.shape[-1]) and out.dtype == x.dtype
    assert keep.shape == (B, k) and keep.dtype == torch.int64
    assert int(keep.min()) >= 0 and int(keep.max()) < N  # in range
    for b in range(B):
        assert len(set(keep[b].tolist())) == k  # unique
        assert torch.equal(out[b, :P], x[b, :P])  # prefix tokens first and untouched
        assert torch.equal(out[b, P:], x[b, P + keep[b]])  # the kept patch tokens themselves
        dropped = torch.ones(N, dtype=torch.bool)
        dropped[keep[b]] = False
        if dropped.any():  # top-k: no dropped token scores above a kept one
            assert score[b, keep[b]].float().min() >= score[b, dropped].float().max()


@FAST
@given(token_batches(), st.integers(1, 4))
def test_stages_chain_to_int_n_rho_to_the_s_tokens_and_indices_stay_on_the_grid(batch, stages):
    x, score, P, rho = batch
    N = score.shape[1]
    counts = keep_counts(N, rho, stages)
    assert counts == tuple(max(1, int(N * rho**s)) for s in range(1, stages + 1))  # at least one per stage
    g = torch.Generator().manual_seed(0)
    index = torch.arange(N).expand(x.shape[0], N)  # original grid position of each current token
    for k in counts:
        s = torch.randn(x.shape[0], x.shape[1] - P, generator=g).to(x.dtype)
        x, keep = select_tokens(x, s, k, P)
        index = index.gather(1, keep)
        assert x.shape[1] == P + k
        assert all(len(set(row.tolist())) == k for row in index)
        assert int(index.min()) >= 0 and int(index.max()) < N


@st.composite
def attention_batches(draw):
    """(logits (B, H, M, M) in [-3, 3], policy (B, M) with prefix tokens kept, dtype)."""
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    M = draw(st.integers(1, 24))
    P = draw(st.integers(0, min(2, M)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    attn = (torch.rand(B, H, M, M, generator=g, dtype=torch.float64) * 6 - 3).to(dtype)
    policy = (torch.rand(B, M, generator=g) < draw(st.floats(0.0, 1.0))).to(dtype)
    policy[:, :P] = 1
    return attn, policy, dtype


@FAST
@given(attention_batches())
def test_masked_softmax_rows_sum_to_one_and_dropped_keys_get_near_zero_weight(batch):
    attn, policy, dtype = batch
    B, H, M, _ = attn.shape
    w = masked_softmax(attn, policy)
    assert w.shape == attn.shape and w.dtype == dtype
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    torch.testing.assert_close(w.float().sum(-1), torch.ones(B, H, M), atol=tol, rtol=0)
    assert (w.float() >= 0).all()
    # Logits within [-3, 3]: the kept sum is at least exp(-6) (the diagonal always counts), so the eps
    # share of a dropped key is below 1e-6 / M / exp(-6) < 5e-4.
    dropped = (policy == 0).view(B, 1, 1, M) & ~torch.eye(M, dtype=torch.bool).view(1, 1, M, M)
    to_dropped = w.float()[dropped.expand(B, H, M, M)]
    assert not len(to_dropped) or to_dropped.max() < 5e-4 + (4e-3 if dtype == torch.bfloat16 else 0)
    # Each row equals the exact softmax over its kept keys (its own key included).
    allowed = ~dropped.expand(B, H, M, M)
    exact = attn.double().masked_fill(~allowed, float("-inf")).softmax(-1)
    torch.testing.assert_close(w.double(), exact, atol=1e-3 if dtype != torch.bfloat16 else 2e-2, rtol=0)


@FAST
@given(st.integers(1, 4), st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_hard_decisions_are_zero_or_one_and_never_revive_a_dropped_token(B, N, seed):
    g = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(B, N, 2, generator=g).log_softmax(-1)
    prev = (torch.rand(B, N, 1, generator=g) < 0.6).float()
    torch.manual_seed(seed)
    d = sample_keep(log_probs, prev)
    assert d.shape == (B, N, 1)
    assert set(d.unique().tolist()) <= {0.0, 1.0}
    assert (d[prev == 0] == 0).all()
