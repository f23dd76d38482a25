"""Zipf shapes: a long-tailed, seeded frequency over the trained colour-shape pairs (data.shapes.pair_zipf_exponent)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from clipforge.config import ShapesConfig
from clipforge.data.synthetic import ShapesDataset, held_out_pairs, pair_frequencies


def labels(cfg: ShapesConfig, n: int, seed: int = 0) -> list[int]:
    ds = ShapesDataset(cfg, 16, seed=seed, split="train")
    return ds.render_batch(range(n))[2].tolist()


def test_zipf_counts_follow_the_planted_probabilities():
    cfg = ShapesConfig(pair_zipf_exponent=1.2)
    ranked, probs = pair_frequencies(cfg)
    assert set(ranked.tolist()).isdisjoint(held_out_pairs(cfg)) and np.isclose(probs.sum(), 1.0)
    assert probs[0] / probs[9] == np.float64(10.0) ** 1.2  # p ~ 1 / rank^s
    n = 6000
    counts = Counter(labels(cfg, n))
    expected = probs * n
    observed = np.array([counts.get(int(k), 0) for k in ranked])
    assert np.all(np.abs(observed - expected) < 4 * np.sqrt(expected) + 2)  # within binomial noise
    assert observed[:5].sum() > 3 * observed[-15:].sum()  # a head and a long tail


def test_zipf_is_a_pure_function_of_the_index_and_zero_is_the_uniform_stream():
    cfg = ShapesConfig(pair_zipf_exponent=1.0)
    ds = ShapesDataset(cfg, 16, seed=3, split="train")
    a = ds.render_batch([5, 17, 400])
    b = ds.render_batch([400, 5, 17])
    assert a[2][[2, 0, 1]].tolist() == b[2].tolist() and a[1][0] == b[1][1]
    uniform = labels(ShapesConfig(), 500)
    assert Counter(uniform).most_common(1)[0][1] < 40  # ~ 500/38 each: no head
    # the default draws exactly as before the knob existed (the first label of index 0 from integers())
    rng = np.random.default_rng([0, 0, 0])
    trained = [k for k in range(48) if k not in held_out_pairs(ShapesConfig())]
    assert uniform[0] == trained[int(rng.integers(len(trained)))]
