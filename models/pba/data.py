"""Trace loading: raw formats and the derived 5 s CSV, split by whole trace."""
import csv
import hashlib
import os
import re
from collections import OrderedDict

import numpy as np

from . import spec

DATA_ROOT = os.environ.get(
    "DWCP_TRACES", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "traces")
)
SOURCES = ["fcc", "lumos5g_4g", "norway_hsdpa"]


def read_raw(path, max_lines=1_000_000):
    """`<time_s> <mbps>` per line (tab or space). Returns (t, mbps) arrays."""
    ts, vs = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= max_lines:
                raise ValueError(f"{path}: more than {max_lines} lines")
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{i + 1}: expected `<time_s> <mbps>`")
            ts.append(float(parts[0]))
            vs.append(float(parts[1]))
    return np.array(ts), np.array(vs)


def resample(ts, vs, step=spec.STEP_S):
    """Time-weighted mean per [t0 + k*step, t0 + (k+1)*step); sample i holds until t[i+1].

    The last sample holds for one more interval equal to the last gap (1 s for 1 s traces).
    Only bins fully covered are emitted. Mirrors `resample` in dwcp-prediction's trace module.
    """
    if len(ts) < 2:
        return np.zeros(0)
    end = ts[-1] + (ts[-1] - ts[-2])
    t0 = ts[0]
    nbins = int(np.floor((end - t0) / step + 1e-9))
    out = np.zeros(nbins)
    edges = np.append(ts, end)
    for k in range(nbins):
        a, b = t0 + k * step, t0 + (k + 1) * step
        acc = 0.0
        # samples overlapping [a, b)
        i = max(int(np.searchsorted(edges, a, side="right")) - 1, 0)
        while i < len(ts) and edges[i] < b:
            lo, hi = max(edges[i], a), min(edges[i + 1], b)
            if hi > lo:
                acc += vs[i] * (hi - lo)
            i += 1
        out[k] = acc / step
    return out


def load_derived(root=DATA_ROOT):
    """OrderedDict trace name -> np.array of 5 s Mbit/s samples, from derived_5s/*.csv."""
    out = OrderedDict()
    for src in SOURCES:
        path = os.path.join(root, "derived_5s", f"{src}.csv")
        with open(path, encoding="utf-8") as f:
            for row in csv.DictReader(f):
                out.setdefault(row["trace"], []).append(float(row["mbps"]))
    return OrderedDict((k, np.array(v)) for k, v in out.items())


def source_of(trace):
    return trace.split("/", 1)[0]


def group_of(trace):
    """Split group: FCC 320 s test windows cut from one measurement share their id."""
    src, name = trace.split("/", 1)
    m = re.match(r"^(?:test_fcc_)?trace_(\d+)_", name)
    if src == "fcc" and m:
        return f"fcc/{m.group(1)}"
    return trace


def split(traces, folds=5):
    """Deterministic split by whole trace group, stratified by source.

    Within each source the groups are ordered by sha256(group); every `folds`-th group
    (ranks 0, folds, 2*folds, ...) is validation. Returns the set of validation traces.
    """
    groups = {}
    for t in traces:
        groups.setdefault(source_of(t), set()).add(group_of(t))
    val_groups = set()
    for src, gs in groups.items():
        ranked = sorted(gs, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
        val_groups.update(g for i, g in enumerate(ranked) if i % folds == 0)
    return {t for t in traces if group_of(t) in val_groups}


def calib_split(traces, folds=5):
    """Calibration traces carved from the TRAINING traces, by whole trace group, stratified
    by source: groups ordered by sha256("calib/" + group), every `folds`-th one. The model
    is not trained on them; the p10 recalibration (`calibrate.py`) is fitted on them."""
    groups = {}
    for t in traces:
        groups.setdefault(source_of(t), set()).add(group_of(t))
    cal = set()
    for gs in groups.values():
        ranked = sorted(gs, key=lambda g: hashlib.sha256(("calib/" + g).encode()).hexdigest())
        cal.update(g for i, g in enumerate(ranked) if i % folds == 0)
    return {t for t in traces if group_of(t) in cal}


def read_node_samples(path, max_lines=10_000_000):
    """Samples recorded by a node (dwcp-prediction `store` module, see FEATURES.md):
    CSV `t_unix_ms,mbps,rtt_ms,loss` with a header line. Split into traces at gaps > 3 steps."""
    traces = OrderedDict()
    cur, last_t, part = [], None, 0
    base = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= max_lines:
                raise ValueError(f"{path}: more than {max_lines} lines")
            if i == 0 or not line.strip():
                continue
            t_ms, mbps = line.split(",")[:2]
            t = int(t_ms) / 1000.0
            if last_t is not None and t - last_t > 3 * spec.STEP_S:
                if cur:
                    traces[f"node/{base}#{part}"] = np.array(cur)
                cur, part = [], part + 1
            cur.append(float(mbps))
            last_t = t
    if cur:
        traces[f"node/{base}#{part}"] = np.array(cur)
    return traces
