"""NMTune: its regularisers against a slow reference, the checklist identities, and a probe that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipforge.eval.nmtune import NMTuneHead, covariance_term, mse_term, nmtune_loss, nmtune_probe, spectral_term


def reference_terms(z: np.ndarray, f: np.ndarray) -> dict[str, float]:
    """The regularisers written out with loops, in float64."""
    n, d = z.shape
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    mse = sum(((zn[i] - fn[i]) ** 2).sum() for i in range(n)) / (n * d)  # nn.MSELoss: mean over every element
    mean = z.mean(axis=0)
    cov = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            cov[i, j] = sum((z[k, i] - mean[i]) * (z[k, j] - mean[j]) for k in range(n)) / (n - 1)
    off = sum(cov[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    s = np.linalg.svd(z, compute_uv=False)
    return {"mse": mse, "cov": off, "svd": (s / s.sum())[:5].mean()}


def test_terms_match_the_reference():
    rng = np.random.default_rng(0)
    z, f = rng.normal(size=(12, 7)), rng.normal(size=(12, 7))
    ref = reference_terms(z, f)
    zt, ft = torch.tensor(z), torch.tensor(f)
    assert float(mse_term(zt, ft)) == pytest.approx(ref["mse"], rel=1e-9)
    assert float(covariance_term(zt)) == pytest.approx(ref["cov"], rel=1e-9)
    assert float(spectral_term(zt)) == pytest.approx(ref["svd"], rel=1e-9)
    logits, y = torch.tensor(rng.normal(size=(12, 3))), torch.tensor(rng.integers(0, 3, 12))
    loss, terms = nmtune_loss(zt, ft, logits, y)
    expected = terms["ce"] + ref["mse"] + 0.04 * ref["cov"] - 0.001 * ref["svd"]  # the minus: spectrum encouraged
    assert float(loss) == pytest.approx(expected, rel=1e-9)


def test_checklist_identities():
    torch.manual_seed(0)
    f = torch.randn(32, 8)
    head = NMTuneHead(8, 3)
    with torch.no_grad():
        head.alpha.zero_()  # no residual branch: z = f, so the MSE term is 0
    z, _ = head(f)
    assert torch.equal(z, f) and float(mse_term(z, f)) == 0.0
    # whitened features (covariance = identity): the covariance term is 0
    x = torch.randn(64, 8, dtype=torch.float64)
    x = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / 63)
    white = x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    assert float(covariance_term(white)) < 1e-20
    # the singular values are normalised to sum to 1: a rank-1 batch puts all its mass on the first
    rank1 = torch.outer(torch.randn(16), torch.randn(8))
    assert float(spectral_term(rank1)) == pytest.approx(1 / 5, abs=1e-6)


def test_the_probe_learns_separable_classes_deterministically():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    y = rng.integers(0, 4, 400)
    x = (centres[y] + rng.normal(size=(400, 16))).astype(np.float32)
    result = nmtune_probe(x[:300], y[:300], x[300:], y[300:], 4, seed=0)
    again = nmtune_probe(x[:300], y[:300], x[300:], y[300:], 4, seed=0)
    assert result["metrics"]["acc1"] > 0.9 and result["metrics"] == again["metrics"]


def test_eval_linear_probe_with_nmtune(tmp_path, capsys, monkeypatch):
    from clipforge.eval import nmtune
    from clipforge.eval.evaluate import EvalError, evaluate

    seen, real_probe = [], nmtune.nmtune_probe
    monkeypatch.setattr(nmtune, "nmtune_probe", lambda tx, ty, x, y, *a, **k: (seen.extend([tx, x]),
                                                                              real_probe(tx, ty, x, y, *a, **k))[1])
    from datafiles import write_folder
    from tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    folder = write_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=6)
    result = evaluate(ckpt, "linear-probe", f"imagefolder:{folder}", train_data=f"imagefolder:{folder}", nmtune=True,
                      per_class=True)
    assert result["linear_probe"]["method"] == "nmtune" and result["options"]["nmtune"] is True
    # the backbone gets no gradient: the probe is handed features cut from any graph
    assert len(seen) == 2 and all(not x.requires_grad and x.grad_fn is None for x in map(torch.as_tensor, seen))
    assert set(result["per_class"]) == {"cat", "dog"}
    with pytest.raises(EvalError, match="--nmtune .* applies to --task linear-probe"):
        evaluate(ckpt, "zeroshot", f"imagefolder:{folder}", nmtune=True)
    from tiny_checkpoint import run_cli

    code, stdout, stderr = run_cli(capsys, "eval", ckpt, "--task", "linear-probe", "--train-data", f"imagefolder:{folder}",
                                   "--data", f"imagefolder:{folder}", "--nmtune", "--workers", "0")
    assert code == 0 and "NMTune" in stdout, stdout + stderr
