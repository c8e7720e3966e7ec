"""Optional multi-scale input channels (experimental, OFF by default; not in spec v1).

Switched on by `python -m pba.train --extra-channels` or `PBA_EXTRA_CHANNELS=1`; then
`spec.features` appends these four channels after the eight v1 channels (`spec.CHANNELS`
becomes 12, and the LSTM input size follows). The exported graph would then take
`x [1, 60, 12]`, which the Rust side (`features.rs`) does not produce: a model trained
with them needs a spec v2 on both sides before it can ship.

Definitions, per window row, computed over the same floored window the v1 channels use:
`x_0 .. x_{w-1}` (`x_j = max(b_j, 0.01)`, the last `w = min(n, 60)` samples, oldest first),
level `L` as in v1. Row `j` uses only `x_0 .. x_j` (causal); padding rows stay 0.

| ch | name | value |
| --- | --- | --- |
| 8 | `ewma_log_ratio` | `clip(ln(e_j / L), -4, 4)`, `e_0 = x_0`, `e_j = 0.3 x_j + 0.7 e_{j-1}` |
| 9 | `hmean5_log_ratio` | `clip(ln(h_j / L), -4, 4)`, `h_j = k / sum(1 / x_i)` over `i = max(0, j-4) .. j`, `k` their count |
| 10 | `vol6_log_diff` | `min(s_j, 4)`, `s_j` = population std (divide by count) of `d_i = ln x_i - ln x_{i-1}` over `i = max(1, j-5) .. j`; 0 when `j = 0` |
| 11 | `min5_log_ratio` | `clip(ln(m_j / L), -4, 4)`, `m_j = min(x_i)` over `i = max(0, j-4) .. j` |

On the newest row, `e` equals the `ewma` baseline and `h` the `harmonic5` baseline
(`baselines.py`) of the same window.
"""
import numpy as np

EWMA_ALPHA = 0.3
HMEAN_N = 5
VOL_N = 6
MIN_N = 5
NAMES = ["ewma_log_ratio", "hmean5_log_ratio", "vol6_log_diff", "min5_log_ratio"]
N_CHANNELS = len(NAMES)


def raw_rows(x):
    """x: floored window samples, oldest first, shape [w].

    Returns [w, 4] float64: ln e_j, ln h_j, s_j (unclipped), ln m_j; the caller subtracts
    ln L from columns 0, 1, 3 and clips. Vectorised over rows; `tests/test_multiscale.py`
    checks it against a row-by-row reading of the definitions above.
    """
    from numpy.lib.stride_tricks import sliding_window_view as win

    x = np.asarray(x, dtype=np.float64)
    w = x.size
    out = np.zeros((w, N_CHANNELS))
    if w == 0:
        return out
    e = np.empty(w)
    e[0] = x[0]
    for j in range(1, w):
        e[j] = EWMA_ALPHA * x[j] + (1.0 - EWMA_ALPHA) * e[j - 1]
    out[:, 0] = np.log(e)
    # trailing windows: pad the front so row j's window ends at j
    inv = win(np.concatenate([np.zeros(HMEAN_N - 1), 1.0 / x]), HMEAN_N)
    cnt = np.minimum(np.arange(1, w + 1), HMEAN_N)
    out[:, 1] = np.log(cnt / inv.sum(axis=1))
    lx = np.log(x)
    d = np.concatenate([np.full(VOL_N, np.nan), lx[1:] - lx[:-1]])  # d_0 undefined
    dw = win(d, VOL_N)  # row j: d_{j-5} .. d_j
    n = np.sum(~np.isnan(dw), axis=1)
    mu = np.nansum(dw, axis=1) / np.maximum(n, 1)
    var = np.nansum((dw - mu[:, None]) ** 2, axis=1) / np.maximum(n, 1)
    out[:, 2] = np.where(n > 0, np.sqrt(var), 0.0)
    out[:, 3] = np.log(win(np.concatenate([np.full(MIN_N - 1, np.inf), x]), MIN_N).min(axis=1))
    return out


def channels(x, log_level, clip):
    """The four extra channels [w, 4] for the floored window `x` and ln L."""
    r = raw_rows(x)
    out = np.empty_like(r)
    for c in (0, 1, 3):
        out[:, c] = np.clip(r[:, c] - log_level, -clip, clip)
    out[:, 2] = np.minimum(r[:, 2], clip)
    return out
