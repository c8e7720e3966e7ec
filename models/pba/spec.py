"""Feature spec v1 (models/FEATURES.md): window -> feature tensor, model output -> forecast.

Everything here must match `node/prediction/src/features.rs` bit for bit up to f32
rounding; `models/golden/*.json` pins both sides.
"""
import json
import math
import os

import numpy as np

from . import multiscale

_HERE = os.path.dirname(os.path.abspath(__file__))
SPEC_PATH = os.path.join(os.path.dirname(_HERE), "features.json")

with open(SPEC_PATH, encoding="utf-8") as f:
    SPEC = json.load(f)

STEP_S = SPEC["step_s"]
WINDOW = SPEC["window"]
MIN_HISTORY = SPEC["min_history"]
HORIZONS_S = SPEC["horizons_s"]
HORIZON_STEPS = [h // STEP_S for h in HORIZONS_S]
LEVEL_SAMPLES = SPEC["level_samples"]
FLOOR = SPEC["floor_mbps"]
CLIP = SPEC["log_ratio_clip"]
LEVEL_SCALE = SPEC["log_level_scale"]
USE_TIME = SPEC["use_time_features"]
V1_CHANNELS = len(SPEC["channels"])
# Optional multi-scale channels (pba/multiscale.py): experimental, off by default, so the
# committed model, the golden vectors and the Rust side stay spec v1.
EXTRA_CHANNELS = os.environ.get("PBA_EXTRA_CHANNELS", "") in ("1", "true")
CHANNELS = V1_CHANNELS + (multiscale.N_CHANNELS if EXTRA_CHANNELS else 0)
OUT_CLIP = SPEC["output_clip"]
N_OUT = 2 * len(HORIZONS_S)


def configure(extra_channels):
    """Switch the experimental multi-scale channels on or off (sets CHANNELS)."""
    global EXTRA_CHANNELS, CHANNELS
    EXTRA_CHANNELS = bool(extra_channels)
    CHANNELS = V1_CHANNELS + (multiscale.N_CHANNELS if EXTRA_CHANNELS else 0)


def level(x):
    """Reference level: geometric mean of the last LEVEL_SAMPLES samples (floored)."""
    tail = np.maximum(np.asarray(x, dtype=np.float64)[-LEVEL_SAMPLES:], FLOOR)
    return float(np.exp(np.mean(np.log(tail))))


def time_features(t_unix_s):
    """(tod_sin, tod_cos, dow_sin, dow_cos) for a UTC unix time in seconds."""
    day = math.floor(t_unix_s / 86400.0)
    tod = (t_unix_s - day * 86400.0) / 86400.0
    dow = ((day + 3) % 7) / 7.0  # 1970-01-01 was a Thursday; Monday = 0
    return (
        math.sin(2 * math.pi * tod),
        math.cos(2 * math.pi * tod),
        math.sin(2 * math.pi * dow),
        math.cos(2 * math.pi * dow),
    )


def features(history, t_last_unix_s=None):
    """Feature tensor [WINDOW, CHANNELS] (float32) and the level L for one forecast.

    `history`: bandwidth samples in Mbit/s at STEP_S, oldest first, at least MIN_HISTORY.
    `t_last_unix_s`: start time of the newest sample if known (only used when the spec's
    `use_time_features` is true).
    """
    x = np.asarray(history, dtype=np.float64)
    if x.size < MIN_HISTORY:
        raise ValueError(f"need at least {MIN_HISTORY} samples, got {x.size}")
    x = np.maximum(x[-WINDOW:], FLOOR)
    w = x.size
    lvl = level(x)
    out = np.zeros((WINDOW, CHANNELS), dtype=np.float64)
    rows = slice(WINDOW - w, WINDOW)
    out[rows, 0] = np.clip(np.log(x / lvl), -CLIP, CLIP)
    out[rows, 1] = 1.0
    out[rows, 2] = math.log(lvl) * LEVEL_SCALE
    if USE_TIME and t_last_unix_s is not None:
        for j in range(w):
            t = t_last_unix_s - (w - 1 - j) * STEP_S
            out[WINDOW - w + j, 3:7] = time_features(t)
            out[WINDOW - w + j, 7] = 1.0
    if EXTRA_CHANNELS:
        out[rows, V1_CHANNELS:] = multiscale.channels(x, math.log(lvl), CLIP)
    return out.astype(np.float32), lvl


def softplus(z):
    return np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))


def postprocess(y, lvl):
    """Model output y[N_OUT] -> (mean[h], p10[h]) in Mbit/s per horizon."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    m = np.clip(y[0::2], -OUT_CLIP, OUT_CLIP)
    g = softplus(y[1::2])
    return lvl * np.exp(m), lvl * np.exp(m - g)


def trace_windows(bw):
    """All forecast positions of one trace, vectorised for training.

    Returns (X [n, WINDOW, CHANNELS] f32, L [n], target_mean [n, H], mask [n, H], pos [n]).
    Position p means the newest sample is index p; the target for horizon h is the mean of
    samples p+1 .. p+h. Positions need MIN_HISTORY samples and at least the shortest horizon.
    """
    bw = np.asarray(bw, dtype=np.float64)
    n = bw.size
    xs, ls, ts, ms, ps = [], [], [], [], []
    for p in range(MIN_HISTORY - 1, n - HORIZON_STEPS[0]):
        f, lvl = features(bw[: p + 1])
        tgt = np.zeros(len(HORIZON_STEPS))
        mk = np.zeros(len(HORIZON_STEPS))
        for k, h in enumerate(HORIZON_STEPS):
            if p + h < n:
                tgt[k] = bw[p + 1 : p + 1 + h].mean()
                mk[k] = 1.0
        xs.append(f)
        ls.append(lvl)
        ts.append(tgt)
        ms.append(mk)
        ps.append(p)
    if not xs:
        return None
    return (
        np.stack(xs),
        np.array(ls),
        np.stack(ts),
        np.stack(ms),
        np.array(ps),
    )
