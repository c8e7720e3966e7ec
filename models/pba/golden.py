"""Golden vectors shared by the Python and Rust tests (models/golden/*.json).

- features.json: history window -> feature tensor and level (spec v1).
- model.json: feature tensor -> raw model output (float32 numpy forward of the trained
  weights, i.e. the training framework's maths) -> (mean, p10) per horizon.
- resample.json: raw `<time_s> <mbps>` samples -> 5 s bins.
"""
import json
import os

import numpy as np

from . import data, lstm, spec


def feature_cases(val):
    cases = []
    names = sorted(val)
    # a few real windows of different lengths, plus synthetic edge cases
    for i, name in enumerate(names[:: max(1, len(names) // 3)][:3]):
        bw = val[name]
        n = min(len(bw), [60, 75, 20][i % 3])
        cases.append({"name": name, "history": [round(float(v), 4) for v in bw[:n]]})
    cases.append({"name": "min_history_with_zeros", "history": [0.0, 0.0, 5.0, 1e-4] + [2.5] * 8})
    cases.append({"name": "huge_jump", "history": [0.02] * 30 + [900.0] * 4})
    out = []
    for c in cases:
        f, lvl = spec.features(c["history"])
        out.append({**c, "level": lvl, "features": f.tolist()})
    return out


def write(params, val, outdir):
    os.makedirs(outdir, exist_ok=True)
    feats = feature_cases(val)
    with open(os.path.join(outdir, "features.json"), "w", encoding="utf-8") as f:
        json.dump({"spec_version": spec.SPEC["spec_version"], "cases": feats}, f)
    model_cases = []
    for c in feats[:4]:
        x = np.asarray(c["features"], np.float32)[None]
        y = lstm.forward_numpy(params, x)[0]
        mean, p10 = spec.postprocess(y, c["level"])
        model_cases.append(
            {"name": c["name"], "features": c["features"], "level": c["level"], "output": y.tolist(),
             "mean_mbps": mean.tolist(), "p10_mbps": p10.tolist()}
        )
    with open(os.path.join(outdir, "model.json"), "w", encoding="utf-8") as f:
        json.dump({"model": "pba_lstm.onnx", "tolerance": 1e-4, "cases": model_cases}, f)
    ts = np.array([0.0, 1.01, 2.011, 3.5, 4.9, 6.2, 7.0, 9.4, 10.1, 12.7, 13.9, 15.2])
    vs = np.array([2.29, 1.36, 2.92, 0.0, 4.1, 3.3, 8.8, 0.5, 1.2, 6.0, 2.2, 7.7])
    with open(os.path.join(outdir, "resample.json"), "w", encoding="utf-8") as f:
        json.dump({"t": ts.tolist(), "mbps": vs.tolist(), "bins": data.resample(ts, vs).tolist()}, f)
