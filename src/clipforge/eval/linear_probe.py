"""Linear probe on frozen image features (methods.md §1, the CLIP paper's protocol).

1. Optionally keep ``k`` random training samples per class (few-shot), seeded.
2. Carve a stratified validation split out of the training features, seeded.
3. Choose the L2 strength C = 1/lambda of an L-BFGS logistic regression (max_iter=1000) by
   validation accuracy (ties broken by validation log loss): a decade grid 1e-6 .. 1e6, then halve the step in log10 space around the best
   value until it is 1/8 decade (0.5, 0.25, 0.125) — at most 13 + 2*3 = 19 fits.
4. Refit with that C on train + validation and report acc1, acc5 and mean per-class recall on test.

Everything is deterministic for a fixed seed (L-BFGS itself has no randomness).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch

from clipforge.eval.zeroshot import classification_metrics

MAX_ITER = 1000
DECADES = (-6, 6)  # log10 C range of the coarse grid
STEPS_PER_DECADE = 8  # finest resolution of the refinement
DEFAULT_C = 1.0  # used when there is no validation data to choose with (e.g. 1-shot)


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the pip command."""


def require_sklearn():
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise MissingDependencyError(
            "the linear probe needs scikit-learn, which is not installed; "
            "run: pip install 'clipforge[eval]'"
        ) from None
    return LogisticRegression


# ----------------------------------------------------------------------------- sample selection
def fewshot_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted indices of ``k`` random samples per class (all of a class that has fewer)."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices; each class gives ~val_fraction to val but keeps >= 1 for training."""
    rng = np.random.default_rng(seed + 1)  # a different stream from the few-shot draw
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ----------------------------------------------------------------------------- choosing C
def sweep_C(score: Callable[[float], Any], decades: tuple[int, int] = DECADES,
            steps_per_decade: int = STEPS_PER_DECADE) -> tuple[float, list[tuple[float, Any]]]:
    """Coarse-to-fine search for the C with the highest ``score(C)``; returns (C, [(C, score), ...]).

    Scores only need to be comparable (a float, or a tuple compared in order). Remaining ties go
    to the smaller C (the stronger regulariser). Each C is scored once.
    """
    scores: dict[float, Any] = {}

    def at(exponent: float) -> Any:
        exponent = round(exponent, 6)
        if exponent not in scores:
            scores[exponent] = score(10.0**exponent)
        return scores[exponent]

    def best_of(exponents) -> float:
        return max(sorted(exponents), key=lambda e: (at(e), -e))

    lo, hi = decades
    best = best_of(range(lo, hi + 1))
    step = 0.5
    while step >= 1 / steps_per_decade - 1e-9:
        candidates = [e for e in (best - step, best, best + step) if lo <= e <= hi]
        best = best_of(candidates)
        step /= 2
    history = [(10.0**e, s) for e, s in sorted(scores.items())]
    return 10.0**best, history


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float):
    LogisticRegression = require_sklearn()
    from sklearn.exceptions import ConvergenceWarning

    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    # One BLAS thread: these problems are small, and next to torch's threads (or a training run)
    # a multi-threaded L-BFGS was 30x slower on 2 busy cores. It also keeps results bit-stable.
    with warnings.catch_warnings(), threadpool_limits(1):
        # very weak regularisation (C ~ 1e6) may stop at max_iter; the sweep judges it by its score
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, max_iter=MAX_ITER).fit(x, y)


def class_logits(clf, x: np.ndarray, num_classes: int) -> torch.Tensor:
    """(N, num_classes) log-probabilities; classes the probe never saw get -inf."""
    logp = clf.predict_log_proba(x)
    out = torch.full((len(x), num_classes), float("-inf"), dtype=torch.float64)
    out[:, torch.as_tensor(clf.classes_, dtype=torch.long)] = torch.from_numpy(logp)
    return out


# ----------------------------------------------------------------------------- the protocol
def linear_probe(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    num_classes: int,
    *,
    fewshot_k: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """Run the protocol above; returns metrics, the chosen C, the sweep and the sample counts."""
    require_sklearn()
    train_x, test_x = _as_float64(train_x), _as_float64(test_x)
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    if fewshot_k is not None:
        keep = fewshot_indices(train_y, fewshot_k, seed)
        train_x, train_y = train_x[keep], train_y[keep]
    if len(np.unique(train_y)) < 2:
        raise ValueError("the linear probe needs training images of at least 2 classes")
    fit_idx, val_idx = stratified_split(train_y, val_fraction, seed)

    def val_score(C: float) -> tuple[float, float]:
        # accuracy decides; on small validation splits it ties often, and the (negated) log loss
        # breaks those ties by how confidently right the probe is instead of by a fixed preference
        clf = fit_logistic(train_x[fit_idx], train_y[fit_idx], C)
        logp = class_logits(clf, train_x[val_idx], num_classes)
        acc = float((logp.argmax(1).numpy() == train_y[val_idx]).mean())
        nll = float(-logp[torch.arange(len(val_idx)), torch.from_numpy(train_y[val_idx])].clamp(min=-1e4).mean())
        return acc, -nll

    if len(val_idx) and len(np.unique(train_y[fit_idx])) > 1:
        C, scores = sweep_C(val_score)
        history = [{"C": c, "val_acc1": acc, "val_log_loss": -neg_nll} for c, (acc, neg_nll) in scores]
    else:
        C, history = DEFAULT_C, []
    clf = fit_logistic(train_x, train_y, C)  # refit on train + val
    logits = class_logits(clf, test_x, num_classes)
    metrics = classification_metrics(logits, torch.from_numpy(test_y), num_classes)
    return {
        "metrics": metrics,
        "C": C,
        "sweep": history,
        "train_samples": int(len(fit_idx)),
        "val_samples": int(len(val_idx)),
        "test_samples": int(len(test_y)),
        "predictions": logits.argmax(1),
    }


def _as_float64(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return x.astype(np.float64)
