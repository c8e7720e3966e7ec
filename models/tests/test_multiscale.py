"""The optional multi-scale channels (pba/multiscale.py): definitions, causality, and that
they stay off by default (spec v1). numpy only.

Run from models/:  python -m unittest discover -s tests -t .
"""
import math
import unittest

import numpy as np

from pba import baselines, multiscale, spec


def reference_rows(x):
    """Row-by-row reading of the definitions in multiscale.py's docstring."""
    out = []
    e = None
    for j in range(len(x)):
        e = x[0] if j == 0 else 0.3 * x[j] + 0.7 * e
        tail = x[max(0, j - 4) : j + 1]
        h = len(tail) / sum(1.0 / v for v in tail)
        d = [math.log(x[i]) - math.log(x[i - 1]) for i in range(max(1, j - 5), j + 1)]
        if d:
            mu = sum(d) / len(d)
            s = math.sqrt(sum((v - mu) ** 2 for v in d) / len(d))
        else:
            s = 0.0
        m = min(x[max(0, j - 4) : j + 1])
        out.append((math.log(e), math.log(h), s, math.log(m)))
    return np.array(out)


def series(rng, n):
    x = np.exp(rng.normal(1.0, 0.8, n))
    x[rng.integers(0, n, max(1, n // 10))] = 0.0  # outages
    return x


class MultiScale(unittest.TestCase):
    def test_matches_the_row_by_row_definition(self):
        rng = np.random.default_rng(5)
        for n in (1, 2, 5, 7, 12, 60):
            x = np.maximum(series(rng, n), spec.FLOOR)
            np.testing.assert_allclose(multiscale.raw_rows(x), reference_rows(list(x)), rtol=1e-12, atol=1e-12)

    def test_causal_appending_a_sample_does_not_change_earlier_rows(self):
        rng = np.random.default_rng(9)
        x = np.maximum(series(rng, 80), spec.FLOOR)
        full = multiscale.raw_rows(x)
        for n in (1, 3, 6, 13, 59, 79):
            np.testing.assert_array_equal(multiscale.raw_rows(x[:n]), full[:n])
            grown = multiscale.raw_rows(np.append(x[:n], 1e3))  # a future spike
            np.testing.assert_array_equal(grown[:n], full[:n])

    def test_newest_row_equals_the_baselines(self):
        rng = np.random.default_rng(2)
        hist = series(rng, 60)
        r = multiscale.raw_rows(np.maximum(hist, spec.FLOOR))
        self.assertAlmostEqual(math.exp(r[-1, 0]), baselines.ewma(hist), places=9)
        self.assertAlmostEqual(math.exp(r[-1, 1]), baselines.harmonic_mean(hist), places=9)

    def test_feature_tensor_with_and_without_extra_channels(self):
        rng = np.random.default_rng(4)
        hist = series(rng, 20)
        self.assertFalse(spec.EXTRA_CHANNELS)  # default: spec v1
        v1, lvl = spec.features(hist)
        self.assertEqual(v1.shape, (spec.WINDOW, 8))
        try:
            spec.configure(True)
            self.assertEqual(spec.CHANNELS, 12)
            f, lvl2 = spec.features(hist)
        finally:
            spec.configure(False)
        self.assertEqual(spec.CHANNELS, 8)
        self.assertEqual(lvl, lvl2)
        self.assertEqual(f.shape, (spec.WINDOW, 12))
        np.testing.assert_array_equal(f[:, :8], v1)
        np.testing.assert_array_equal(f[: spec.WINDOW - 20, 8:], 0)  # padding rows
        x = np.maximum(hist, spec.FLOOR)
        r = multiscale.raw_rows(x)
        want = np.stack(
            [
                np.clip(r[:, 0] - math.log(lvl), -4, 4),
                np.clip(r[:, 1] - math.log(lvl), -4, 4),
                np.minimum(r[:, 2], 4),
                np.clip(r[:, 3] - math.log(lvl), -4, 4),
            ],
            axis=1,
        )
        np.testing.assert_allclose(f[spec.WINDOW - 20 :, 8:], want, atol=1e-6)

    def test_causal_through_the_feature_tensor(self):
        # Relative to ln L the rows shift when a sample is appended; undo that and compare
        # (no outages here, so the +-4 clip does not bite on either side).
        rng = np.random.default_rng(8)
        hist = np.exp(rng.normal(1.0, 0.5, 30))
        try:
            spec.configure(True)
            f0, l0 = spec.features(hist)
            f1, l1 = spec.features(np.append(hist, 500.0))
        finally:
            spec.configure(False)
        a = f0[spec.WINDOW - 30 :, [8, 9, 11]] + math.log(l0)
        b = f1[spec.WINDOW - 31 : -1, [8, 9, 11]] + math.log(l1)
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_array_equal(f0[spec.WINDOW - 30 :, 10], f1[spec.WINDOW - 31 : -1, 10])


if __name__ == "__main__":
    unittest.main()
