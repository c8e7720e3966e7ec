"""LSTM forecaster in JAX, with the ONNX gate layout (i, o, f, c) so export is a copy.

JAX is imported inside the training functions only, so the golden tests need just numpy
and onnx.
"""
import numpy as np


def init_params(key, n_in, hidden, n_out):
    """hidden: list of layer widths, e.g. [64] or [64, 32]."""
    import jax
    import jax.numpy as jnp

    params = {"layers": []}
    d = n_in
    for h in hidden:
        key, k1, k2 = jax.random.split(key, 3)
        s = 1.0 / np.sqrt(h)
        W = jax.random.uniform(k1, (4 * h, d), minval=-s, maxval=s)
        R = jax.random.uniform(k2, (4 * h, h), minval=-s, maxval=s)
        b = jnp.zeros((4 * h,))
        # forget gate bias 1 (rows 2h..3h in i,o,f,c order)
        b = b.at[2 * h : 3 * h].set(1.0)
        params["layers"].append({"W": W, "R": R, "b": b})
        d = h
    key, k3 = jax.random.split(key)
    s = 1.0 / np.sqrt(d)
    params["Wo"] = jax.random.uniform(k3, (n_out, d), minval=-s, maxval=s) * 0.1
    params["bo"] = jnp.zeros((n_out,))
    return params


def lstm_layer(layer, xs):
    """xs: [T, B, D] -> hs [T, B, H]."""
    import jax
    import jax.numpy as jnp

    W, R, b = layer["W"], layer["R"], layer["b"]
    H = R.shape[1]
    B = xs.shape[1]
    xw = jnp.einsum("tbd,gd->tbg", xs, W) + b

    def step(carry, xt):
        h, c = carry
        g = xt + h @ R.T
        i = jax.nn.sigmoid(g[:, :H])
        o = jax.nn.sigmoid(g[:, H : 2 * H])
        f = jax.nn.sigmoid(g[:, 2 * H : 3 * H])
        cc = jnp.tanh(g[:, 3 * H :])
        c = f * c + i * cc
        h = o * jnp.tanh(c)
        return (h, c), h

    z = jnp.zeros((B, H), dtype=xs.dtype)
    _, hs = jax.lax.scan(step, (z, z), xw)
    return hs


def forward(params, x):
    """x: [B, T, C] -> y [B, n_out]."""
    import jax.numpy as jnp

    hs = jnp.transpose(x, (1, 0, 2))
    for layer in params["layers"]:
        hs = lstm_layer(layer, hs)
    return hs[-1] @ params["Wo"].T + params["bo"]


def to_numpy(params):
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.float32), params)


def forward_numpy(params, x):
    """Reference forward pass in float32 numpy (what the golden vectors record)."""
    x = np.asarray(x, dtype=np.float32)
    hs = np.transpose(x, (1, 0, 2))
    for layer in params["layers"]:
        W, R, b = layer["W"], layer["R"], layer["b"]
        H = R.shape[1]
        h = np.zeros((hs.shape[1], H), np.float32)
        c = np.zeros_like(h)
        out = []
        for t in range(hs.shape[0]):
            g = hs[t] @ W.T + h @ R.T + b
            sig = lambda v: 1.0 / (1.0 + np.exp(-v))
            i, o, f = sig(g[:, :H]), sig(g[:, H : 2 * H]), sig(g[:, 2 * H : 3 * H])
            cc = np.tanh(g[:, 3 * H :])
            c = f * c + i * cc
            h = o * np.tanh(c)
            out.append(h)
        hs = np.stack(out)
    return hs[-1] @ params["Wo"].T + params["bo"]
