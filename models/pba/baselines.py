"""The simple predictors the model must beat; same definitions as dwcp-prediction's
`baselines` module (models/FEATURES.md, "Baselines"). Each takes the history (oldest first,
Mbit/s at 5 s) and returns one forecast used for every horizon."""
import numpy as np

from . import spec

HARMONIC_N = 5
EWMA_ALPHA = 0.3
ROBUST_N = 5


def last_value(x):
    return max(float(x[-1]), spec.FLOOR)


def harmonic_mean(x, n=HARMONIC_N):
    tail = np.maximum(np.asarray(x[-n:], dtype=np.float64), spec.FLOOR)
    return float(len(tail) / np.sum(1.0 / tail))


def ewma(x, alpha=EWMA_ALPHA):
    e = max(float(x[0]), spec.FLOOR)
    for v in x[1:]:
        e = alpha * max(float(v), spec.FLOOR) + (1 - alpha) * e
    return e


def robust_mpc(x, n=ROBUST_N):
    """RobustMPC (Yin et al. 2015, as in Pensieve's mpc code): harmonic mean of the last n,
    divided by 1 + the largest relative error of the last n one-step harmonic predictions."""
    x = np.maximum(np.asarray(x, dtype=np.float64), spec.FLOOR)
    errs = []
    for i in range(max(1, len(x) - n), len(x)):
        if i < 1:
            continue
        pred = harmonic_mean(x[:i], n)
        errs.append(abs(pred - x[i]) / x[i])
    m = max(errs) if errs else 0.0
    return harmonic_mean(x, n) / (1.0 + m)


ALL = {
    "last": last_value,
    "harmonic5": harmonic_mean,
    "robust_mpc": robust_mpc,
    "ewma": ewma,
}
