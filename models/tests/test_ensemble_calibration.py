"""Ensemble folding, p10 recalibration and the calibration split (numpy only, no JAX).

Run from models/:  python -m unittest discover -s tests -t .
"""
import unittest

import numpy as np

from pba import calibrate, data, ensemble, lstm, spec


def random_params(rng, hidden, channels=spec.CHANNELS, n_out=spec.N_OUT):
    s = 1.0 / np.sqrt(hidden)
    f = lambda *shape: rng.uniform(-s, s, shape).astype(np.float32)
    return {
        "layers": [{"W": f(4 * hidden, channels), "R": f(4 * hidden, hidden), "b": f(4 * hidden)}],
        "Wo": f(n_out, hidden),
        "bo": f(n_out),
    }


class Ensemble(unittest.TestCase):
    def test_block_diagonal_lstm_is_the_mean_of_its_members(self):
        rng = np.random.default_rng(7)
        members = [random_params(rng, 16), random_params(rng, 16), random_params(rng, 8)]
        x = rng.normal(0, 1, (3, spec.WINDOW, spec.CHANNELS)).astype(np.float32)
        want = np.mean([lstm.forward_numpy(p, x) for p in members], axis=0)
        c = ensemble.combine(members)
        self.assertEqual(c["layers"][0]["R"].shape, (4 * 40, 40))
        np.testing.assert_allclose(lstm.forward_numpy(c, x), want, atol=1e-5)

    def test_one_member_is_unchanged(self):
        p = random_params(np.random.default_rng(1), 8)
        self.assertIs(ensemble.combine([p]), p)


class Calibration(unittest.TestCase):
    def test_apply_maps_only_the_gap_outputs(self):
        rng = np.random.default_rng(3)
        p = random_params(rng, 8)
        x = rng.normal(0, 1, (4, spec.WINDOW, spec.CHANNELS)).astype(np.float32)
        ab = [(0.5, 0.2), (1.0, 0.0), (1.5, -0.3), (2.0, 1.0)]
        y0 = lstm.forward_numpy(p, x)
        y1 = lstm.forward_numpy(calibrate.apply(p, ab), x)
        np.testing.assert_allclose(y1[:, 0::2], y0[:, 0::2], atol=1e-6)
        for k, (a, b) in enumerate(ab):
            np.testing.assert_allclose(y1[:, 2 * k + 1], a * y0[:, 2 * k + 1] + b, atol=1e-5)

    def test_fit_brings_each_source_to_ten_percent_when_the_gap_is_scaled_wrong(self):
        # Two sources whose log error spreads differ (0.05 and 0.4); the "model" predicts the
        # right median and a gap that is half the true 10 % gap on both: too high a p10.
        rng = np.random.default_rng(11)
        n = 4000
        sd = np.where(np.arange(2 * n) < n, 0.05, 0.4)
        S = np.array(["a"] * n + ["b"] * n)
        L = np.full(2 * n, 10.0)
        z = rng.normal(0, 1, (2 * n, len(spec.HORIZONS_S))) * sd[:, None]
        T = L[:, None] * np.exp(z)
        M = np.ones_like(T)
        gap = 0.5 * 1.2816 * sd  # true p10 gap of a normal is 1.2816 sd
        y_gap = np.log(np.expm1(gap))  # inverse softplus
        Y = np.zeros((2 * n, spec.N_OUT))
        Y[:, 1::2] = y_gap[:, None]
        before = np.mean(T[:, 0] < L * np.exp(-gap))
        self.assertGreater(before, 0.2)
        ab = calibrate.fit(Y, T, L, M, S)
        for k, (a, b) in enumerate(ab):
            g = spec.softplus(a * Y[:, 2 * k + 1] + b)
            for src in ("a", "b"):
                sel = S == src
                cov = np.mean(T[sel, k] < L[sel] * np.exp(-g[sel]))
                self.assertLess(abs(cov - 0.1), 0.03, f"h{k} source {src}: {cov}")


class CalibSplit(unittest.TestCase):
    def test_whole_groups_disjoint_from_validation_and_deterministic(self):
        names = [f"fcc/test_fcc_trace_{m}_http---x.com_{i}_0" for m in range(12) for i in range(3)]
        names += [f"lumos5g_4g/run{i}" for i in range(30)]
        val = data.split(names)
        train = [t for t in names if t not in val]
        cal = data.calib_split(train)
        self.assertEqual(cal, data.calib_split(list(reversed(train))))
        self.assertTrue(cal and not (cal & val))
        self.assertTrue(any(data.source_of(t) == "fcc" for t in cal))
        self.assertTrue(any(data.source_of(t) == "lumos5g_4g" for t in cal))
        for t in cal:  # every window of a measurement goes with it
            self.assertTrue(all(u in cal for u in train if data.group_of(u) == data.group_of(t)))


if __name__ == "__main__":
    unittest.main()
