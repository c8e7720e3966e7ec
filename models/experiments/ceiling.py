"""Ceiling study: can a richer model reach the PBA targets on this data?

Gradient-boosted trees (one per horizon, median forecast of the log ratio of the actual
mean to the level L) on hand-made features of the same 60-sample window, side by side with
the shipped LSTM (`pba_lstm.onnx`) and the four baselines, then a shrink frontier for the
over-estimation target. Everything is fitted on the FIT traces (training traces minus the
calibration traces, as `python -m pba.train --calib-fold 5`), every choice (configuration,
number of trees, LSTM/GBM blend weight, shrink factor) is made on the CALIBRATION traces,
and the VALIDATION traces (`pba.data.split`, `validation_traces.txt`) are scored once at
the end with the choices frozen.

    cd models
    OMP_NUM_THREADS=1 nice -n 5 /work/venvs/ceiling/bin/python experiments/ceiling.py \
        --out /tmp/ceiling_results.json --md /tmp/ceiling_tables.md

Needs numpy, scipy, scikit-learn, onnx (to read the LSTM weights) and optionally lightgbm
(`experiments/README.md`). Windows, targets, the actual-mean floor, the APE and
over-estimation definitions and the baselines come from `pba.spec`, `pba.baselines` and
`pba.evaluate`, so the numbers are comparable with `metrics.json` / `MODEL_CARD.md`.
"""
import argparse
import json
import os
import sys
import time
import warnings
from collections import OrderedDict

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # models/
sys.path.insert(0, HERE)

from pba import baselines, data, evaluate, lstm, spec  # noqa: E402
from tests.test_golden import params_from_onnx  # noqa: E402  (numpy reader of the ONNX weights)

H = spec.HORIZONS_S
BASE = list(baselines.ALL)  # last, harmonic5, robust_mpc, ewma
SHRINK = [round(1.0 - 0.05 * i, 2) for i in range(9)]  # 1.0 .. 0.6
TARGET_GAIN, TARGET_OVER = 0.20, 0.15
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)


# --------------------------------------------------------------------------- windows


def collect(traces):
    """Every forecast position of `traces` exactly as `train.evaluate_all` enumerates them
    (spec.trace_windows): LSTM input X, level L, actual means T, mask M, the raw history
    window (<= 60 samples, NaN-padded on the left), the four baselines and the source."""
    Xs, Ls, Ts, Ms, Ws, Bs, Ss, Ns = [], [], [], [], [], [], [], []
    for name, bw in traces.items():
        w = spec.trace_windows(bw)
        if w is None:
            continue
        X, L, T, M, P = w
        for j, p in enumerate(P):
            hist = bw[: p + 1][-spec.WINDOW :]
            row = np.full(spec.WINDOW, np.nan)
            row[spec.WINDOW - len(hist) :] = hist
            Ws.append(row)
            Bs.append([baselines.ALL[b](hist) for b in BASE])
        Xs.append(X)
        Ls.append(L)
        Ts.append(T)
        Ms.append(M)
        Ss += [data.source_of(name)] * len(L)
        Ns += [name] * len(L)
    return {
        "X": np.concatenate(Xs),
        "L": np.concatenate(Ls),
        "T": np.concatenate(Ts),
        "M": np.concatenate(Ms) > 0,
        "W": np.array(Ws),
        "B": np.array(Bs),
        "S": np.array(Ss),
        "name": np.array(Ns),
    }


# --------------------------------------------------------------------------- features


def _ewma_lin(x, alpha):
    """EWMA in linear space started at the first valid sample (as baselines.ewma)."""
    e = np.full(len(x), np.nan)
    for j in range(x.shape[1]):
        v = x[:, j]
        e = np.where(np.isnan(e), v, np.where(np.isnan(v), e, alpha * v + (1 - alpha) * e))
    return e


def _slope(y):
    """OLS slope per row over the non-NaN entries of y (x = 0, 1, 2, ...)."""
    t = np.broadcast_to(np.arange(y.shape[1], dtype=float), y.shape)
    ok = ~np.isnan(y)
    n = ok.sum(1)
    tm = np.where(ok, t, 0).sum(1) / n
    ym = np.nansum(y, 1) / n
    dt = np.where(ok, t - tm[:, None], 0)
    dy = np.where(ok, y - ym[:, None], 0)
    return (dt * dy).sum(1) / np.maximum((dt * dt).sum(1), 1e-9)


def features(D, with_source=False):
    """Hand-made, scale-free features of the window (everything relative to the level L,
    in log space, clipped to +-4 like spec v1). No source id and no absolute level unless
    `with_source` (the upper-bound variant: one-hot source and ln L added)."""
    x = np.maximum(D["W"], spec.FLOOR)  # NaN stays NaN (padding)
    lL = np.log(D["L"])[:, None]
    lx = np.log(x)
    r = np.clip(lx - lL, -spec.CLIP, spec.CLIP)
    d = np.diff(lx, axis=1)  # log steps, NaN where padding
    cols, names = [], []

    def add(v, n):
        cols.append(np.asarray(v, float).reshape(len(x), -1))
        names.extend([n] if cols[-1].shape[1] == 1 else [f"{n}{i}" for i in range(cols[-1].shape[1])])

    def lr(v):  # log ratio of a level-like statistic to L
        return np.clip(np.log(np.maximum(v, spec.FLOOR)) - lL[:, 0], -spec.CLIP, spec.CLIP)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        add(r, "r")  # raw log-ratio window, r59 = last sample
        add((~np.isnan(r)).sum(1), "n_valid")
        for hl in (1, 2, 4, 8, 16):
            add(lr(_ewma_lin(x, 1 - 0.5 ** (1 / hl))), f"ewma_hl{hl}")
        add(lr(D["B"][:, BASE.index("ewma")]), "ewma_a0.3")
        add(lr(D["B"][:, BASE.index("robust_mpc")]), "robust_mpc")
        add(np.log(D["B"][:, BASE.index("harmonic5")] / D["B"][:, BASE.index("robust_mpc")]), "rmpc_log1p_maxerr")
        for k in (3, 5, 10, 20):
            add(lr(1.0 / np.nanmean(1.0 / x[:, -k:], 1)), f"hmean{k}")
        for k in (10, 20, 60):
            add(lr(np.nanmean(x[:, -k:], 1)), f"amean{k}")
        for k in (12, 60):
            add(np.nanmedian(r[:, -k:], 1), f"median_r{k}")
        for k in (5, 10, 20, 60):
            add(np.nanmin(r[:, -k:], 1), f"min_r{k}")
            add(np.nanmax(r[:, -k:], 1), f"max_r{k}")
        for k in (5, 10, 20, 59):
            add(np.nanstd(d[:, -k:], 1), f"std_d{k}")
            add(np.nanmean(np.abs(d[:, -k:]), 1), f"mabs_d{k}")
        for k in (5, 10, 20):
            add(np.nanmin(d[:, -k:], 1), f"min_d{k}")
            add(np.nanmax(d[:, -k:], 1), f"max_d{k}")
        for k in (10, 20, 60):
            add(_slope(lx[:, -k:]), f"slope{k}")
        add(np.nanmean(r < -np.log(2), 1), "frac_below_half")
        add(np.nanmean(r > np.log(2), 1), "frac_above_double")
        add(np.nanmean(x <= 0.1, 1), "frac_outage")
    if with_source:
        for s in data.SOURCES:
            add(D["S"] == s, f"src_{s}")
        add(lL[:, 0], "log_level")
    F = np.concatenate(cols, axis=1).astype(np.float32)
    return F, names


def target(D, k):
    """z_k = ln(max(T_k, floor) / L), the training target of train.py (targets_log)."""
    return np.log(np.maximum(D["T"][:, k], spec.FLOOR) / D["L"])


# --------------------------------------------------------------------------- metrics


def cell_table(D, preds):
    """preds: name -> [n, H] forecast means. Per (source, horizon): evaluate.metrics of every
    predictor (models and baselines), the best baseline by median APE, gains."""
    out = OrderedDict()
    allp = dict(preds)
    for i, b in enumerate(BASE):
        allp[b] = np.repeat(D["B"][:, i : i + 1], len(H), axis=1)
    for s in data.SOURCES:
        for k, h in enumerate(H):
            sel = (D["S"] == s) & D["M"][:, k]
            if not sel.any():
                continue
            a = D["T"][sel, k]
            m = {n: evaluate.metrics(p[sel, k], a) for n, p in allp.items()}
            best = min(BASE, key=lambda b: m[b]["median_ape"])
            for n in m:
                m[n]["gain"] = 1 - m[n]["median_ape"] / m[best]["median_ape"]
            out[(s, h)] = {"best_baseline": best, "m": m}
    return out


def summary(tab, name):
    g = np.array([c["m"][name]["gain"] for c in tab.values()])
    o = np.array([c["m"][name]["over_rate"] for c in tab.values()])
    return {
        "cells_gain20": int((g >= TARGET_GAIN).sum()),
        "mean_gain": float(g.mean()),
        "min_gain": float(g.min()),
        "cells_over15": int((o <= TARGET_OVER).sum()),
        "max_over": float(o.max()),
    }


def score(D, pred, k):
    """Selection criterion for one horizon: mean over sources of the gain vs the best baseline."""
    gains = []
    for s in data.SOURCES:
        sel = (D["S"] == s) & D["M"][:, k]
        a = D["T"][sel, k]
        mape = evaluate.metrics(pred[sel], a)["median_ape"]
        best = min(evaluate.metrics(D["B"][sel, i], a)["median_ape"] for i in range(len(BASE)))
        gains.append(1 - mape / best)
    return float(np.mean(gains))


def md_cells(tab, models, title):
    lines = [f"**{title}**", ""]
    hdr = "| source | h | n | best baseline (mAPE) | " + " | ".join(f"{m} mAPE / gain / over" for m in models) + " |"
    lines += [hdr, "| " + " | ".join(["---"] * (4 + len(models))) + " |"]
    for (s, h), c in tab.items():
        b = c["best_baseline"]
        row = f"| {s} | {h} | {c['m'][b]['n']} | {b} ({c['m'][b]['median_ape']:.3f}) |"
        for m in models:
            mm = c["m"][m]
            flag = "**" if mm["gain"] >= TARGET_GAIN else ""
            row += f" {mm['median_ape']:.3f} / {flag}{mm['gain']:+.1%}{flag} / {mm['over_rate']:.1%} |"
        lines.append(row)
    lines.append("| cells >= 20 % gain (mean gain; over <= 15 % cells) | | | |" + "".join(
        f" {summary(tab, m)['cells_gain20']}/12 ({summary(tab, m)['mean_gain']:+.1%}; {summary(tab, m)['cells_over15']}/12) |"
        for m in models))
    return "\n".join(lines)


# --------------------------------------------------------------------------- models


HGB_CONFIGS = {
    "hgb_l15": dict(max_leaf_nodes=15, min_samples_leaf=100, learning_rate=0.05, l2_regularization=1.0),
    "hgb_l63": dict(max_leaf_nodes=63, min_samples_leaf=200, learning_rate=0.05, l2_regularization=1.0),
}
LGB_CONFIGS = {
    "lgb_l15": dict(num_leaves=15, min_child_samples=100, learning_rate=0.05, reg_lambda=1.0,
                    colsample_bytree=0.8, subsample=0.8, subsample_freq=1),
    "lgb_l63": dict(num_leaves=63, min_child_samples=200, learning_rate=0.05, reg_lambda=1.0,
                    colsample_bytree=0.8, subsample=0.8, subsample_freq=1),
}
# trees: up to 300 for sklearn's HGB (about 45-70 s per fit single-threaded here), 600 for
# LightGBM (about 25 s); the number used is chosen on calibration from these checkpoints
MAX_ITER = {"hgb": 300, "lgb": 600}


def checkpoints(family):
    return [i for i in (10, 20, 30, 40, 60, 80, 100, 150, 200, 250, 300, 400, 500, 600) if i <= MAX_ITER[family]]


def source_weights(S):
    """Each source the same total weight (the first half of train.py's weighting)."""
    srcs, counts = np.unique(S, return_counts=True)
    w = {s: len(S) / (len(srcs) * c) for s, c in zip(srcs, counts)}
    return np.array([w[s] for s in S])


def fit_gbm(family, cfg, F, z, w):
    if family == "hgb":
        from sklearn.ensemble import HistGradientBoostingRegressor

        m = HistGradientBoostingRegressor(loss="absolute_error", max_iter=MAX_ITER["hgb"], early_stopping=False,
                                          random_state=0, **HGB_CONFIGS[cfg])
        m.fit(F, z, sample_weight=w)
        return m
    import lightgbm as lgb

    m = lgb.LGBMRegressor(objective="l1", n_estimators=MAX_ITER["lgb"], random_state=0, n_jobs=1, deterministic=True,
                          force_row_wise=True, verbose=-1, **LGB_CONFIGS[cfg])
    m.fit(F, z, sample_weight=w)
    return m


def staged(family, model, F):
    """Predictions at the checkpoints: {iters: z_hat}."""
    check = checkpoints(family)
    if family == "hgb":
        out = {}
        for i, p in enumerate(model.staged_predict(F), start=1):
            if i in check:
                out[i] = p
        return out
    return {i: model.predict(F, num_iteration=i) for i in check}


def lstm_predict(params, X, batch=2048):
    Y = np.concatenate([lstm.forward_numpy(params, X[i : i + batch]) for i in range(0, len(X), batch)])
    m = np.clip(Y[:, 0::2].astype(np.float64), -spec.OUT_CLIP, spec.OUT_CLIP)  # spec.postprocess, vectorised
    return m  # log ratio of the forecast mean to L


# --------------------------------------------------------------------------- shrink frontier


def frontier(D, preds, names):
    """For each estimator and s in SHRINK: per cell over rate and gain vs the UNSHRUNK best
    baseline; 'best_baseline' is the per-cell best baseline, itself shrunk."""
    base_tab = cell_table(D, {})
    res = {n: {} for n in names}
    for s in SHRINK:
        for n in names:
            cells = OrderedDict()
            for (src, h), c in base_tab.items():
                k = H.index(h)
                sel = (D["S"] == src) & D["M"][:, k]
                a = D["T"][sel, k]
                if n == "best_baseline":
                    p = D["B"][sel, BASE.index(c["best_baseline"])]
                else:
                    p = preds[n][sel, k]
                mm = evaluate.metrics(s * p, a)
                ref = c["m"][c["best_baseline"]]["median_ape"]
                cells[(src, h)] = {"over": mm["over_rate"], "mape": mm["median_ape"], "gain": 1 - mm["median_ape"] / ref}
            res[n][s] = cells
    return res, base_tab


def s_needed(D, preds, names, base_tab):
    """Per cell: the largest s with over-estimation <= 15 % (1.1 / q85 of pred/actual), and
    the median APE and gain (vs the unshrunk best baseline) at that s. An oracle per cell:
    describes the frontier, chooses nothing."""
    out = {n: OrderedDict() for n in names}
    for (src, h), c in base_tab.items():
        k = H.index(h)
        sel = (D["S"] == src) & D["M"][:, k]
        a = np.maximum(D["T"][sel, k], 0.01)
        ref = c["m"][c["best_baseline"]]["median_ape"]
        for n in names:
            p = D["B"][sel, BASE.index(c["best_baseline"])] if n == "best_baseline" else preds[n][sel, k]
            ratio = np.sort(p / a)
            # largest s with mean(s * ratio > 1.1) <= 0.15
            j = int(np.floor(TARGET_OVER * len(ratio)))  # allowed count above
            s = min(1.0, 1.1 / ratio[len(ratio) - j - 1]) * (1 - 1e-9) if j < len(ratio) else 1.0
            mm = evaluate.metrics(s * p, D["T"][sel, k])
            out[n][(src, h)] = {"s": float(s), "over": mm["over_rate"], "mape": mm["median_ape"],
                                "gain": 1 - mm["median_ape"] / ref}
    return out


def choose_shrink(fr_cal, name):
    """On calibration: the largest s with over <= 15 % in every cell (global) and per source."""
    def ok(s, src=None):
        return all(v["over"] <= TARGET_OVER for (sr, _), v in fr_cal[name][s].items() if src in (None, sr))

    glob = next((s for s in SHRINK if ok(s)), None)
    per = {src: next((s for s in SHRINK if ok(s, src)), None) for src in data.SOURCES}
    return glob, per


def md_frontier(fr, name, title):
    lines = [f"**{title}** (per cell: over-estimation / gain vs unshrunk best baseline)", ""]
    lines.append("| source | h | " + " | ".join(f"s={s}" for s in SHRINK) + " |")
    lines.append("| " + " | ".join(["---"] * (2 + len(SHRINK))) + " |")
    for cell in fr[name][SHRINK[0]]:
        row = f"| {cell[0]} | {cell[1]} |"
        for s in SHRINK:
            v = fr[name][s][cell]
            o = f"**{v['over']:.0%}**" if v["over"] <= TARGET_OVER else f"{v['over']:.0%}"
            row += f" {o} / {v['gain']:+.0%} |"
        lines.append(row)
    cnt = " | ".join(
        f"{sum(v['over'] <= TARGET_OVER for v in fr[name][s].values())} / {sum(v['gain'] >= TARGET_GAIN for v in fr[name][s].values())}"
        for s in SHRINK)
    lines.append(f"| cells over<=15 % / gain>=20 % | | {cnt} |")
    return "\n".join(lines)


def md_shrunk(fr, names, choice, title):
    """Per cell at the shrink chosen on calibration (global or per source)."""
    lines = [f"**{title}**", ""]
    lines.append("| source | h | " + " | ".join(f"{n}: s, over, mAPE, gain" for n in names) + " |")
    lines.append("| " + " | ".join(["---"] * (2 + len(names))) + " |")
    cells = list(fr[names[0]][SHRINK[0]])
    for cell in cells:
        row = f"| {cell[0]} | {cell[1]} |"
        for n in names:
            s = choice[n](cell[0])
            if s is None:
                row += " not reached by 0.6 |"
                continue
            v = fr[n][s][cell]
            row += f" {s}, {v['over']:.1%}, {v['mape']:.3f}, {v['gain']:+.1%} |"
        lines.append(row)
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default=data.DATA_ROOT)
    ap.add_argument("--model", default=os.path.join(HERE, "pba_lstm.onnx"))
    ap.add_argument("--out", default="/tmp/ceiling_results.json")
    ap.add_argument("--md", default="", help="also write the markdown tables here")
    ap.add_argument("--no-lgb", action="store_true")
    args = ap.parse_args()

    traces = data.load_derived(args.traces)
    val_names = data.split(list(traces))
    with open(os.path.join(HERE, "validation_traces.txt"), encoding="utf-8") as f:
        shipped_val = {l.strip() for l in f if l.strip()}
    assert val_names == shipped_val, "validation split differs from validation_traces.txt"
    tr = {k: v for k, v in traces.items() if k not in val_names}
    cal_names = data.calib_split(list(tr), 5)
    sets = {
        "fit": {k: v for k, v in tr.items() if k not in cal_names},
        "cal": {k: v for k, v in tr.items() if k in cal_names},
        "val": {k: v for k, v in traces.items() if k in val_names},
    }
    D = {}
    for nm, tset in sets.items():
        D[nm] = collect(tset)
        log(f"{nm}: {len(tset)} traces, {len(D[nm]['L'])} windows")

    # ---- shipped LSTM (mean outputs; same weights as metrics.json's evaluation)
    params = params_from_onnx(args.model)
    zl = {nm: lstm_predict(params, D[nm]["X"]) for nm in ("cal", "val")}
    log("LSTM forecasts done")

    families = ["hgb"]
    if not args.no_lgb:
        try:
            import lightgbm  # noqa: F401

            families.append("lgb")
        except ImportError:
            log("lightgbm not installed: skipped")

    F = {nm: features(D[nm])[0] for nm in D}
    fnames = features(D["cal"])[1]
    Fsrc = {nm: features(D[nm], with_source=True)[0] for nm in D}
    log(f"features: {len(fnames)} source-agnostic (+4 in the upper-bound variant)")
    wts = {"none": np.ones(len(D["fit"]["L"])), "src": source_weights(D["fit"]["S"])}

    # ---- fit every configuration on FIT, choose (config, weighting, trees) per horizon on CAL
    sel_log = {}
    chosen = {fam: {} for fam in families}
    zg = {fam: {nm: np.zeros((len(D[nm]["L"]), len(H))) for nm in ("cal", "val")} for fam in families}
    for fam in families:
        cfgs = HGB_CONFIGS if fam == "hgb" else LGB_CONFIGS
        for k, h in enumerate(H):
            m_fit = D["fit"]["M"][:, k]
            z = target(D["fit"], k)[m_fit]
            best = None
            for cfg in cfgs:
                for wn, w in wts.items():
                    t = time.time()
                    model = fit_gbm(fam, cfg, F["fit"][m_fit], z, w[m_fit])
                    st = staged(fam, model, F["cal"])
                    scores = {it: score(D["cal"], D["cal"]["L"] * np.exp(p), k) for it, p in st.items()}
                    it = max(scores, key=scores.get)
                    sel_log[f"{fam}/{h}/{cfg}/{wn}"] = {"best_iter": it, "cal_mean_gain": scores[it],
                                                        "gain_by_iter": scores, "fit_s": time.time() - t}
                    log(f"{fam} h={h} {cfg} w={wn}: best {it} trees, cal mean gain {scores[it]:+.3f} ({time.time() - t:.0f} s)")
                    if best is None or scores[it] > best[0]:
                        best = (scores[it], cfg, wn, it, model)
            _, cfg, wn, it, model = best
            chosen[fam][h] = {"cfg": cfg, "weights": wn, "iters": it}
            for nm in ("cal", "val"):
                zg[fam][nm][:, k] = staged(fam, model, F[nm])[it]
    log(f"chosen: {chosen}")

    def mean_of(nm, z):
        return D[nm]["L"][:, None] * np.exp(z)

    cal_preds = {"lstm": mean_of("cal", zl["cal"])}
    for fam in families:
        cal_preds[fam] = mean_of("cal", zg[fam]["cal"])
    tab_cal = cell_table(D["cal"], cal_preds)
    best_fam = max(families, key=lambda f: summary(tab_cal, f)["mean_gain"])
    log(f"best GBM family on calibration: {best_fam}")

    # ---- upper bound: best family, its chosen config per horizon, + source one-hot and ln L
    zu = {nm: np.zeros((len(D[nm]["L"]), len(H))) for nm in ("cal", "val")}
    for k, h in enumerate(H):
        c = chosen[best_fam][h]
        m_fit = D["fit"]["M"][:, k]
        model = fit_gbm(best_fam, c["cfg"], Fsrc["fit"][m_fit], target(D["fit"], k)[m_fit], wts[c["weights"]][m_fit])
        st = staged(best_fam, model, Fsrc["cal"])
        scores = {it: score(D["cal"], D["cal"]["L"] * np.exp(p), k) for it, p in st.items()}
        it = max(scores, key=scores.get)
        chosen.setdefault("upper", {})[h] = {**c, "iters": it}
        for nm in ("cal", "val"):
            zu[nm][:, k] = staged(best_fam, model, Fsrc[nm])[it]
        log(f"upper bound h={h}: {it} trees, cal mean gain {scores[it]:+.3f}")

    # ---- blend LSTM and best GBM in log space, weight per horizon on CAL
    blend_w = {}
    zb = {nm: np.zeros((len(D[nm]["L"]), len(H))) for nm in ("cal", "val")}
    for k, h in enumerate(H):
        sc = {a: score(D["cal"], D["cal"]["L"] * np.exp(a * zl["cal"][:, k] + (1 - a) * zg[best_fam]["cal"][:, k]), k)
              for a in (0.0, 0.25, 0.5, 0.75, 1.0)}
        a = max(sc, key=sc.get)
        blend_w[h] = a
        for nm in ("cal", "val"):
            zb[nm][:, k] = a * zl[nm][:, k] + (1 - a) * zg[best_fam][nm][:, k]
    log(f"blend weight of the LSTM per horizon (cal): {blend_w}")

    preds = {}
    for nm in ("cal", "val"):
        p = {"lstm": mean_of(nm, zl[nm])}
        for fam in families:
            p[fam] = mean_of(nm, zg[fam][nm])
        p["blend"] = mean_of(nm, zb[nm])
        p["upper_src"] = mean_of(nm, zu[nm])
        preds[nm] = p
    models = ["lstm"] + families + ["blend", "upper_src"]
    tabs = {nm: cell_table(D[nm], preds[nm]) for nm in ("cal", "val")}

    # ---- shrink frontier: LSTM, best GBM, best baseline; s chosen on CAL
    fnames_front = ["lstm", best_fam, "best_baseline"]
    fr, s_glob, s_src, s_need = {}, {}, {}, {}
    for nm in ("cal", "val"):
        fr[nm], btab = frontier(D[nm], preds[nm], fnames_front)
        s_need[nm] = s_needed(D[nm], preds[nm], fnames_front, btab)
    for n in fnames_front:
        s_glob[n], s_src[n] = choose_shrink(fr["cal"], n)
    log(f"shrink chosen on calibration: global {s_glob}, per source {s_src}")

    # ---- report
    md = []
    md.append(f"Features ({len(fnames)}): {', '.join(fnames[60:])}, plus the 60 log ratios r0..r59.\n")
    md.append("Chosen on calibration (per horizon): " + json.dumps({f: {str(h): v for h, v in c.items()} for f, c in chosen.items()})
              + f"; best GBM family: {best_fam}; LSTM weight in the blend: {json.dumps(blend_w)}\n")
    md.append(md_cells(tabs["cal"], models, "Calibration traces (selection set)"))
    md.append("")
    md.append(md_cells(tabs["val"], models, "Validation traces (scored once, choices frozen)"))
    md.append("")
    for nm, label in (("cal", "calibration"), ("val", "validation")):
        for n in fnames_front:
            md.append(md_frontier(fr[nm], n, f"Shrink frontier, {n}, {label}"))
            md.append("")
    for nm, label in (("cal", "calibration (in-sample for s)"), ("val", "validation")):
        md.append(md_shrunk(fr[nm], fnames_front, {n: (lambda src, n=n: s_glob[n]) for n in fnames_front},
                            f"One s for all cells, chosen on calibration: {s_glob}; {label}"))
        md.append("")
        md.append(md_shrunk(fr[nm], fnames_front, {n: (lambda src, n=n: s_src[n][src]) for n in fnames_front},
                            f"s per source, chosen on calibration: {s_src}; {label}"))
        md.append("")
    for nm, label in (("cal", "calibration"), ("val", "validation")):
        lines = [f"**Exact s per cell for over-estimation = 15 % (oracle per cell, describes the frontier), {label}**", "",
                 "| source | h | " + " | ".join(f"{n}: s, mAPE, gain" for n in fnames_front) + " | model gain vs baseline at equal over |",
                 "| " + " | ".join(["---"] * (3 + len(fnames_front))) + " |"]
        for cell in s_need[nm]["lstm"]:
            row = f"| {cell[0]} | {cell[1]} |"
            for n in fnames_front:
                v = s_need[nm][n][cell]
                row += f" {v['s']:.2f}, {v['mape']:.3f}, {v['gain']:+.1%} |"
            b = s_need[nm]["best_baseline"][cell]["mape"]
            row += " " + ", ".join(f"{n} {1 - s_need[nm][n][cell]['mape'] / b:+.1%}" for n in fnames_front[:2]) + " |"
            lines.append(row)
        md.append("\n".join(lines))
        md.append("")
    text = "\n".join(md)
    print(text)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    def jcells(tab):
        return {f"{s}@{h}": {"best_baseline": c["best_baseline"], **{n: c["m"][n] for n in c["m"]}} for (s, h), c in tab.items()}

    res = {
        "windows": {nm: int(len(D[nm]["L"])) for nm in D},
        "traces": {nm: len(sets[nm]) for nm in sets},
        "features": fnames,
        "selection": sel_log,
        "chosen": {f: {str(h): v for h, v in c.items()} for f, c in chosen.items()},
        "best_gbm_family": best_fam,
        "blend_lstm_weight": {str(h): v for h, v in blend_w.items()},
        "calibration": jcells(tabs["cal"]),
        "validation": jcells(tabs["val"]),
        "summary": {nm: {m: summary(tabs[nm], m) for m in models} for nm in ("cal", "val")},
        "shrink_global": s_glob,
        "shrink_per_source": s_src,
        "frontier": {nm: {n: {str(s): {f"{c[0]}@{c[1]}": v for c, v in cells.items()} for s, cells in fr[nm][n].items()}
                          for n in fnames_front} for nm in fr},
        "s_needed": {nm: {n: {f"{c[0]}@{c[1]}": v for c, v in cells.items()} for n, cells in s_need[nm].items()} for nm in s_need},
        "runtime_s": time.time() - T0,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
