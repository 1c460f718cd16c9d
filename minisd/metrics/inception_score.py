"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits.

Follows torch-fidelity's `isc_features_to_metric` (metric_isc.py) exactly, as BK-SDM reports
`torch-fidelity --isc`: the samples are shuffled by numpy's RandomState(2020), cut into 10 splits
at i*N//10, p(y) is the mean softmax of each split, and the std is numpy's (ddof=0) over the
splits. The inputs are the unbiased logits (`InceptionV3.unbiased_logits`, torch-fidelity's
default IS layer) of the torch-fidelity input path.
"""

import numpy as np
import torch


def inception_score(logits, splits: int = 10, shuffle: bool = True, seed: int = 2020) -> tuple[float, float]:
    """logits [N, C] (tensor or array) -> (mean, std) of the per-split Inception Scores."""
    logits = torch.as_tensor(logits)
    if logits.ndim != 2:
        raise ValueError(f"inception_score needs logits [N, classes], got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"cannot cut {n} samples into {splits} splits; use at least {splits} images or "
                         "fewer splits")
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(n), :]
    logits = logits.double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)

    scores = []
    for i in range(splits):
        part = slice(i * n // splits, (i + 1) * n // splits)
        p_y = p[part].mean(dim=0, keepdim=True)  # the split's marginal p(y)
        kl = (p[part] * (log_p[part] - p_y.log())).sum(dim=1)  # KL(p(y|x) || p(y)) per sample
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))
