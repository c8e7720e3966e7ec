"""An ensemble of one-layer LSTMs as ONE LSTM with block-diagonal weights.

The mean of N members' raw outputs `mean_j(Wo_j h_j + bo_j)` equals one LSTM whose hidden
state is the concatenation of the members' (each member's gates only see its own units:
block-diagonal R, stacked W) followed by one Gemm with `[Wo_1 .. Wo_N] / N` and the mean
bias. So the exported graph keeps its shape (one ONNX `LSTM` op, one `Gemm`).
"""
import numpy as np


def combine(members):
    if len(members) == 1:
        return members[0]
    if any(len(p["layers"]) != 1 for p in members):
        raise ValueError("only one-layer members can be combined")
    hs = [p["layers"][0]["R"].shape[1] for p in members]
    ht = sum(hs)
    c = members[0]["layers"][0]["W"].shape[1]
    n_out = members[0]["Wo"].shape[0]
    W = np.zeros((4 * ht, c), np.float32)
    R = np.zeros((4 * ht, ht), np.float32)
    b = np.zeros(4 * ht, np.float32)
    Wo = np.zeros((n_out, ht), np.float32)
    off = 0
    for p, h in zip(members, hs):
        layer = p["layers"][0]
        for g in range(4):  # gate blocks i, o, f, c
            rows = slice(g * ht + off, g * ht + off + h)
            src = slice(g * h, (g + 1) * h)
            W[rows] = layer["W"][src]
            R[rows, off : off + h] = layer["R"][src]
            b[rows] = layer["b"][src]
        Wo[:, off : off + h] = np.asarray(p["Wo"], np.float32) / len(members)
        off += h
    bo = np.mean([np.asarray(p["bo"], np.float32) for p in members], axis=0).astype(np.float32)
    return {"layers": [{"W": W, "R": R, "b": b}], "Wo": Wo, "bo": bo}
