"""Exact nearest-neighbour cosine distance to a memory bank, chunked: equal to a brute-force loop,
the same for every chunking, 0 for a query that is in the bank, and clear errors."""

import math

import pytest
import torch

from pipeline.models.memory_bank import nearest_cosine_distance


def _brute(queries, bank):
    """The definition, one pair at a time."""
    out = []
    for q in queries.tolist():
        best = math.inf
        for b in bank.tolist():
            dot = sum(x * y for x, y in zip(q, b))
            cos = dot / (math.sqrt(sum(x * x for x in q)) * math.sqrt(sum(y * y for y in b)))
            best = min(best, 1.0 - cos)
        out.append(best)
    return torch.tensor(out)


def test_equals_the_brute_force_definition_for_every_chunking():
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(37, 8, generator=g), torch.randn(23, 8, generator=g)
    want = _brute(queries, bank)
    for qc, bc in ((4096, 65536), (1, 1), (5, 7), (37, 23), (36, 22)):
        got = nearest_cosine_distance(queries, bank, query_chunk=qc, bank_chunk=bc)
        assert got.dtype == torch.float32 and got.shape == (37,)
        torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)


def test_a_query_from_the_bank_is_at_distance_zero_and_a_far_one_is_not():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(16, 32, generator=g)
    queries = torch.cat(
        [bank[3:4] * 2.5, -bank[5:6], torch.randn(1, 32, generator=g)]
    )  # a scaled copy, an opposite, a random one
    got = nearest_cosine_distance(queries, bank, bank_chunk=4)
    assert abs(float(got[0])) <= 1e-6
    assert float(got[1]) > 0.5 and float(got[2]) > 0.2
    assert bool((got >= 0).all()) and bool((got <= 2).all())


def test_half_precision_features_are_compared_in_float32():
    g = torch.Generator().manual_seed(2)
    queries, bank = torch.randn(9, 16, generator=g), torch.randn(11, 16, generator=g)
    full = nearest_cosine_distance(queries, bank)
    half = nearest_cosine_distance(queries.half(), bank.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=5e-3)


def test_bad_banks_and_queries_are_named():
    with pytest.raises(ValueError, match="the memory bank is empty"):
        nearest_cosine_distance(torch.randn(2, 4), torch.empty(0, 4))
    with pytest.raises(ValueError, match="queries have 4, the bank has 5"):
        nearest_cosine_distance(torch.randn(2, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="a bank feature has norm 0 \\(row 1\\)"):
        nearest_cosine_distance(torch.randn(2, 4), torch.stack([torch.ones(4), torch.zeros(4)]))
    with pytest.raises(ValueError, match="must be 2-d"):
        nearest_cosine_distance(torch.randn(2, 3, 4), torch.randn(3, 4))
    assert nearest_cosine_distance(torch.empty(0, 4), torch.randn(3, 4)).shape == (0,)
