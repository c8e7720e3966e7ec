"""p10 recalibration on held-out training traces (split conformal, source-agnostic map).

The quantile head over-fits the traces it was trained on: on unseen cellular traces its p10
was too high (13-19 % of actual means fell below it instead of 10 %). Before export, the
p10 gap of horizon k is recalibrated on calibration traces the model was not trained on
(carved from the TRAINING traces by whole trace group, `data.calib_split`):

    gap_k = softplus(a_k * y[2k+1] + b_k)

For each `a_k` on a grid, `b_k` is set by bisection so that exactly 10 % of the calibration
windows' actual means fall below the p10 (each source weighted equally); the `a_k` with the
lowest pinball(0.1) loss is kept. The map uses only the model's own output (no source
label), and it is folded into the final Gemm's rows for the gap outputs, so the exported
graph, the feature spec and the Rust post-processing are unchanged.
"""
import numpy as np

from . import spec

A_GRID = np.round(np.arange(0.5, 2.01, 0.1), 2)
TARGET = 0.1


def _parts(Y, T, L, k, a, b):
    m = np.clip(Y[:, 2 * k], -spec.OUT_CLIP, spec.OUT_CLIP)
    q = m - spec.softplus(a * Y[:, 2 * k + 1] + b)
    z = np.log(np.maximum(T[:, k], spec.FLOOR) / L)
    u = z - q
    pin = np.maximum(TARGET * u, (TARGET - 1.0) * u)
    below = np.maximum(T[:, k], spec.FLOOR) < L * np.exp(q)
    return below, pin


def _weights(M, S, k):
    sel = M[:, k] > 0
    w = np.zeros(len(sel))
    srcs = sorted(set(S[sel]))
    for s in srcs:
        ss = sel & (S == s)
        w[ss] = 1.0 / (len(srcs) * ss.sum())
    return w


def fit(Y, T, L, M, S):
    """Raw outputs Y [n, 8] on the calibration windows -> [(a_k, b_k)] per horizon."""
    out = []
    for k in range(len(spec.HORIZONS_S)):
        w = _weights(M, S, k)
        if w.sum() == 0:
            out.append((1.0, 0.0))
            continue
        best = None
        for a in A_GRID:
            lo, hi = -20.0, 20.0
            for _ in range(60):  # larger b: larger gap, lower p10, lower coverage
                b = 0.5 * (lo + hi)
                below, _ = _parts(Y, T, L, k, a, b)
                if np.sum(w * below) > TARGET:
                    lo = b
                else:
                    hi = b
            _, pin = _parts(Y, T, L, k, a, b)
            loss = float(np.sum(w * pin))
            if best is None or loss < best[0]:
                best = (loss, float(a), float(b))
        out.append((best[1], best[2]))
    return out


def apply(params, ab):
    """Folds the map into the output layer: rows 2k+1 of Wo and bo."""
    Wo = np.array(params["Wo"], np.float32).copy()
    bo = np.array(params["bo"], np.float32).copy()
    for k, (a, b) in enumerate(ab):
        Wo[2 * k + 1] *= a
        bo[2 * k + 1] = a * bo[2 * k + 1] + b
    return {**params, "Wo": Wo, "bo": bo}
