"""Metrics per source and horizon (same definitions as `dwcp-testnet bench prediction`)."""
import numpy as np

OVER = 1.10


def metrics(pred, actual, p10=None):
    a = np.maximum(actual, 0.01)
    ape = np.abs(pred - a) / a
    out = {
        "n": int(len(a)),
        "median_ape": float(np.median(ape)) if len(a) else float("nan"),
        "p90_ape": float(np.percentile(ape, 90)) if len(a) else float("nan"),
        "over_rate": float(np.mean(pred > OVER * a)) if len(a) else float("nan"),
    }
    if p10 is not None:
        out["p10_coverage"] = float(np.mean(a < p10)) if len(a) else float("nan")
    return out
