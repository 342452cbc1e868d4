"""Bit allocation: within budget, optimal against brute force on small problems."""
import itertools
import random

import pytest

from birdbone_core.errors import BirdboneError
from birdbone_core.quant.budget import allocate


def random_problem(seed, n_tensors=5):
    rng = random.Random(seed)
    opts = {}
    for t in range(n_tensors):
        size = rng.choice([256, 1024, 4096])
        sens = rng.uniform(0.1, 10)
        opts[f"t{t}"] = {name: (size * bits // 8, sens * 2.0 ** (-bits) * rng.uniform(0.8, 1.2))
                         for name, bits in (("Q2", 2), ("Q4", 4), ("Q6", 6), ("Q8", 8))}
    return opts


def brute_force(opts, budget):
    names = list(opts)
    best = None
    for combo in itertools.product(*[list(opts[n]) for n in names]):
        b = sum(opts[n][k][0] for n, k in zip(names, combo))
        e = sum(opts[n][k][1] for n, k in zip(names, combo))
        if b <= budget and (best is None or e < best):
            best = e
    return best


@pytest.mark.parametrize("seed", range(12))
def test_near_optimal_and_within_budget(seed):
    opts = random_problem(seed)
    total8 = sum(o["Q8"][0] for o in opts.values())
    for frac in (0.3, 0.5, 0.7, 0.9):
        budget = int(total8 * frac)
        a = allocate(opts, budget)
        assert a.n_bytes <= budget
        assert a.n_bytes == sum(opts[t][k][0] for t, k in a.choice.items())
        best = brute_force(opts, budget)
        assert a.error <= best * 1.05 + 1e-12, (frac, a.error, best)


def test_uniform_budget_beats_uniform_type():
    """With sensitivities that differ a lot, spending bits unevenly beats one type for all at equal size."""
    opts = {f"t{i}": {n: (1024 * b // 8, (10.0 ** i) * 2.0 ** (-2 * b)) for n, b in (("Q2", 2), ("Q4", 4), ("Q6", 6))}
            for i in range(4)}
    uniform = sum(o["Q4"][1] for o in opts.values())
    a = allocate(opts, 4 * 1024 * 4 // 8)
    assert a.error < uniform / 2


def test_bigger_budget_never_worse_and_errors():
    opts = random_problem(3)
    errs = [allocate(opts, b).error for b in range(2000, 40000, 2000)
            if b >= sum(min(v[0] for v in o.values()) for o in opts.values())]
    assert all(e2 <= e1 + 1e-12 for e1, e2 in zip(errs, errs[1:]))
    with pytest.raises(BirdboneError, match="below the smallest possible size"):
        allocate(opts, 10)
    with pytest.raises(BirdboneError, match="has no allowed type"):
        allocate({"x": {}}, 10)
    assert allocate({}, 0).choice == {}
