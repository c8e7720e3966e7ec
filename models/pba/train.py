"""Train the PBA LSTM, evaluate it against the baselines on the validation split, export
ONNX, write golden vectors and the metrics the model card quotes.

    python -m pba.train --out pba_lstm.onnx      (run from models/)

Reproducible: fixed seed, deterministic split by whole trace (data.split), CPU only.
"""
import argparse
import json
import os
import time
from collections import defaultdict

import numpy as np

from . import baselines, calibrate, data, ensemble, evaluate, spec

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_set(traces):
    X, L, T, M, S = [], [], [], [], []
    for name, bw in traces.items():
        w = spec.trace_windows(bw)
        if w is None:
            continue
        x, l, t, m, _ = w
        X.append(x)
        L.append(l)
        T.append(t)
        M.append(m)
        S += [data.source_of(name)] * len(l)
    return np.concatenate(X), np.concatenate(L), np.concatenate(T), np.concatenate(M), np.array(S)


def targets_log(T, L):
    return np.log(np.maximum(T, spec.FLOOR) / L[:, None])


def train(args, Xtr, Ltr, Ttr, Mtr, Str):
    import jax
    import jax.numpy as jnp

    from . import lstm

    Z = targets_log(Ttr, Ltr).astype(np.float32)
    # balance sources: each source carries the same total weight
    srcs, counts = np.unique(Str, return_counts=True)
    wmap = {s: len(Str) / (len(srcs) * c) for s, c in zip(srcs, counts)}
    if args.rel_weight:
        # Scale each source by its typical error so stable links (FCC: ~5 % errors) count
        # as much as volatile ones: the loss then measures relative improvement.
        for s in srcs:
            zs = np.abs(Z[Str == s, 0][Mtr[Str == s, 0] > 0])
            wmap[s] /= max(float(np.median(zs)), 1e-3)
        norm = np.mean([wmap[s] for s in Str])
        wmap = {s: w / norm for s, w in wmap.items()}
        print("source weights", {s: round(w, 3) for s, w in wmap.items()})
    Wt = np.array([wmap[s] for s in Str], np.float32)
    Mtr = Mtr.astype(np.float32)
    hw = np.asarray(args.horizon_weights, np.float32)
    if hw.shape != (len(spec.HORIZONS_S),):
        raise SystemExit(f"--horizon-weights needs {len(spec.HORIZONS_S)} values")

    key = jax.random.PRNGKey(args.seed)
    params = lstm.init_params(key, spec.CHANNELS, args.hidden, spec.N_OUT)
    tau_m, tau_q = args.tau_mean, 0.1

    def pinball(u, tau):
        return jnp.maximum(tau * u, (tau - 1.0) * u)

    def loss_fn(p, x, z, m, w):
        y = lstm.forward(p, x)
        mu = y[:, 0::2]
        q = mu - jax.nn.softplus(y[:, 1::2])
        if args.mean_loss == "ape":
            # relative error of the mean forecast, |L e^mu - T| / T (the evaluation metric)
            lm = 2.0 * jnp.abs(jnp.exp(jnp.clip(mu, -spec.OUT_CLIP, spec.OUT_CLIP) - z) - 1.0)
        else:
            lm = pinball(z - mu, tau_m)
        l = lm + pinball(z - q, tau_q)
        mw = m * w[:, None] * hw[None, :]
        return jnp.sum(l * mw) / jnp.sum(mw)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    # Adam
    mom = jax.tree_util.tree_map(jnp.zeros_like, params)
    vel = jax.tree_util.tree_map(jnp.zeros_like, params)
    b1, b2, eps = 0.9, 0.999, 1e-8

    @jax.jit
    def adam(p, g, m, v, t, lr):
        m = jax.tree_util.tree_map(lambda a, b: b1 * a + (1 - b1) * b, m, g)
        v = jax.tree_util.tree_map(lambda a, b: b2 * a + (1 - b2) * b * b, v, g)
        mh = jax.tree_util.tree_map(lambda a: a / (1 - b1**t), m)
        vh = jax.tree_util.tree_map(lambda a: a / (1 - b2**t), v)
        p = jax.tree_util.tree_map(lambda a, b, c: a - lr * b / (jnp.sqrt(c) + eps), p, mh, vh)
        return p, m, v

    rng = np.random.default_rng(args.seed)
    n = len(Xtr)
    step = 0
    steps_total = args.epochs * (n // args.batch)
    t0 = time.time()
    for ep in range(args.epochs):
        perm = rng.permutation(n)
        tot = 0.0
        for bi in range(n // args.batch):
            idx = perm[bi * args.batch : (bi + 1) * args.batch]
            x = Xtr[idx].copy()
            if args.level_aug > 0:
                # shift the absolute level so the model does not key on one source's level
                shift = rng.uniform(-args.level_aug, args.level_aug, size=len(idx)).astype(np.float32)
                x[:, :, 2] += (shift[:, None] * spec.LEVEL_SCALE) * x[:, :, 1]
            step += 1
            lr = args.lr * 0.5 * (1 + np.cos(np.pi * step / steps_total))
            lv, g = grad_fn(params, x, Z[idx], Mtr[idx], Wt[idx])
            params, mom, vel = adam(params, g, mom, vel, step, lr)
            tot += float(lv)
        print(f"epoch {ep + 1}/{args.epochs} loss {tot / max(1, n // args.batch):.4f} ({time.time() - t0:.0f} s)", flush=True)
    return lstm.to_numpy(params)


_FWD = None


def predict_batch(params, X):
    import jax

    from . import lstm

    global _FWD
    if _FWD is None or _FWD[0] is not params:
        _FWD = (params, jax.jit(lambda x: lstm.forward(params, x)))
    f = _FWD[1]
    B = 1024
    out = []
    for i in range(0, len(X), B):
        chunk = X[i : i + B]
        n = len(chunk)
        if n < B:  # fixed batch shape: one compilation only
            chunk = np.concatenate([chunk, np.zeros((B - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(f(chunk))[:n])
    return np.concatenate(out)


def evaluate_all(params, val):
    """Per (source, horizon): model and every baseline on the validation traces."""
    rows = defaultdict(lambda: defaultdict(lambda: {"pred": [], "act": [], "p10": []}))
    for name, bw in val.items():
        w = spec.trace_windows(bw)
        if w is None:
            continue
        X, L, T, M, P = w
        Y = predict_batch(params, X)
        src = data.source_of(name)
        for j in range(len(L)):
            mean, p10 = spec.postprocess(Y[j], L[j])
            hist = bw[: P[j] + 1][-spec.WINDOW :]
            bl = {k: f(hist) for k, f in baselines.ALL.items()}
            for k, h in enumerate(spec.HORIZONS_S):
                if M[j, k] == 0:
                    continue
                r = rows[(src, h)]
                r["lstm"]["pred"].append(mean[k])
                r["lstm"]["p10"].append(p10[k])
                r["lstm"]["act"].append(T[j, k])
                for b, v in bl.items():
                    r[b]["pred"].append(v)
                    r[b]["act"].append(T[j, k])
    out = {}
    for (src, h), r in sorted(rows.items()):
        out[f"{src}@{h}"] = {
            k: evaluate.metrics(np.array(v["pred"]), np.array(v["act"]), np.array(v["p10"]) if v["p10"] else None)
            for k, v in r.items()
        }
    return out


def print_table(res):
    print(f"{'source@h':22} {'lstm':>16} {'best baseline':>26} {'gain':>6} {'over':>5} {'p10cov':>6}")
    for key, r in res.items():
        bname = min((b for b in r if b != "lstm"), key=lambda b: r[b]["median_ape"])
        b = r[bname]["median_ape"]
        m = r["lstm"]
        print(
            f"{key:22} {m['median_ape']:16.3f} {bname + ' ' + format(b, '.3f'):>26} {1 - m['median_ape'] / b:6.1%} "
            f"{m['over_rate']:5.2f} {m['p10_coverage']:6.3f}"
        )


def save_params(params, path):
    flat = {"Wo": params["Wo"], "bo": params["bo"]}
    for i, l in enumerate(params["layers"]):
        for k, v in l.items():
            flat[f"{k}{i}"] = v
    np.savez(path, **flat)


def load_params(path):
    z = np.load(path)
    layers = []
    i = 0
    while f"W{i}" in z:
        layers.append({"W": z[f"W{i}"], "R": z[f"R{i}"], "b": z[f"b{i}"]})
        i += 1
    return {"layers": layers, "Wo": z["Wo"], "bo": z["bo"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default=data.DATA_ROOT)
    ap.add_argument("--samples", nargs="*", default=[], help="node sample files (retrain hook)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[64])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tau-mean", type=float, default=0.5)
    ap.add_argument(
        "--mean-loss", choices=["pinball", "ape"], default="pinball", help="loss of the mean head (pinball on the log ratio, or APE)"
    )
    ap.add_argument("--level-aug", type=float, default=1.0)
    ap.add_argument("--rel-weight", type=int, default=1, help="weight sources by 1/typical error")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--horizon-weights", type=float, nargs="+", default=[1.0, 1.0, 1.0, 1.0], help="loss weight per horizon"
    )
    ap.add_argument(
        "--extra-channels",
        action="store_true",
        default=spec.EXTRA_CHANNELS,
        help="append the experimental multi-scale channels (pba/multiscale.py; not spec v1, not in Rust)",
    )
    ap.add_argument(
        "--eval-calib",
        action="store_true",
        help="model selection: after training, evaluate on the calibration traces only, write that to "
        "--metrics and stop (no validation evaluation, no export)",
    )
    ap.add_argument(
        "--ensemble", type=int, default=1, help="members trained with seeds seed.. (one-layer: exported as one LSTM)"
    )
    ap.add_argument(
        "--calib-fold",
        type=int,
        default=5,
        help="hold out every K-th training trace group to recalibrate the p10 on (0: no recalibration)",
    )
    ap.add_argument("--save-params", default="/tmp/pba_params.npz", help="trained weights (npz)")
    ap.add_argument("--load-params", default="", help="skip training, use these weights")
    ap.add_argument("--out", default=os.path.join(HERE, "pba_lstm.onnx"))
    ap.add_argument("--metrics", default=os.path.join(HERE, "metrics.json"))
    ap.add_argument("--golden", default=os.path.join(HERE, "golden"))
    ap.add_argument(
        "--split-out",
        default=os.path.join(HERE, "validation_traces.txt"),
        help="where the validation split is written (a node's retrain writes beside its job)",
    )
    args = ap.parse_args()
    spec.configure(args.extra_channels)
    if args.eval_calib and (args.calib_fold <= 0 or args.load_params):
        raise SystemExit("--eval-calib needs --calib-fold > 0 and training (no --load-params)")

    traces = data.load_derived(args.traces)
    for path in args.samples:
        for k, v in data.read_node_samples(path).items():
            traces[k] = v
    val_names = data.split(list(traces))
    tr = {k: v for k, v in traces.items() if k not in val_names}
    val = {k: v for k, v in traces.items() if k in val_names}
    cal_names = set()
    if args.calib_fold > 0 and not args.load_params:
        cal_names = data.calib_split(list(tr), args.calib_fold)
    fit = {k: v for k, v in tr.items() if k not in cal_names}
    cal = {k: v for k, v in tr.items() if k in cal_names}
    print(f"train traces {len(tr)} (fitted on {len(fit)}, p10 calibration on {len(cal)}), validation traces {len(val)}")
    Xtr, Ltr, Ttr, Mtr, Str = build_set(fit)
    print(f"train windows {len(Xtr)}")
    calib_info = None
    if args.load_params:
        params = load_params(args.load_params)  # as saved: ensemble and calibration included
        if params["layers"][0]["W"].shape[1] != spec.CHANNELS:
            raise SystemExit(f"{args.load_params}: input size differs from {spec.CHANNELS} channels (--extra-channels?)")
    else:
        members = []
        for i in range(max(1, args.ensemble)):
            run = argparse.Namespace(**{**vars(args), "seed": args.seed + i})
            members.append(train(run, Xtr, Ltr, Ttr, Mtr, Str))
        params = ensemble.combine(members)
        if args.eval_calib:
            # median APE (the mean outputs) is what selection looks at; the p10 map is not
            # fitted here, so the printed p10 coverage is the raw model's
            res = evaluate_all(params, cal)
            print(f"calibration traces {len(cal)} (model selection only)")
            print_table(res)
            save_params(params, args.save_params)
            with open(args.metrics, "w", encoding="utf-8") as f:
                json.dump({"args": vars(args), "calibration_traces": sorted(cal), "train_windows": int(len(Xtr)),
                           "results_calibration": res}, f, indent=1)
            return
        if cal and any(spec.trace_windows(v) is not None for v in cal.values()):
            Xc, Lc, Tc, Mc, Sc = build_set(cal)
            before = evaluate_all(params, cal)
            ab = calibrate.fit(predict_batch(params, Xc), Tc, Lc, Mc, Sc)
            params = calibrate.apply(params, ab)
            after = evaluate_all(params, cal)
            calib_info = {
                "traces": sorted(cal),
                "windows": int(len(Xc)),
                "a_b_per_horizon": ab,
                "p10_coverage_before": {k: r["lstm"]["p10_coverage"] for k, r in before.items()},
                "p10_coverage_after": {k: r["lstm"]["p10_coverage"] for k, r in after.items()},
            }
            print("p10 recalibration (a, b) per horizon:", [(round(a, 2), round(b, 3)) for a, b in ab])
        save_params(params, args.save_params)
    res = evaluate_all(params, val)
    print_table(res)

    from . import export_onnx, golden

    model = export_onnx.build(params, spec.WINDOW, spec.CHANNELS, spec.N_OUT, doc=json.dumps(vars(args)))
    import onnx

    onnx.save(model, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    with open(args.metrics, "w", encoding="utf-8") as f:
        json.dump(
            {
                "args": vars(args),
                "train_traces": len(tr),
                "validation_traces": sorted(val),
                "train_windows": int(len(Xtr)),
                "calibration": calib_info,
                "results": res,
            },
            f,
            indent=1,
        )
    with open(args.split_out, "w", encoding="utf-8") as f:
        f.write("\n".join(sorted(val)) + "\n")
    golden.write(params, val, args.golden)


if __name__ == "__main__":
    main()
