"""Golden vectors, Python side (the Rust side checks the same files).

Run from models/:  python -m unittest discover -s tests -t .
"""
import json
import os
import unittest

import numpy as np

from pba import data, lstm, spec

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(HERE, "golden")
MODEL = os.path.join(HERE, "pba_lstm.onnx")


def load(name):
    with open(os.path.join(GOLDEN, name), encoding="utf-8") as f:
        return json.load(f)


def params_from_onnx(path):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    layers = []
    i = 0
    while f"W{i}" in init:
        H = init[f"R{i}"].shape[2]
        b = init[f"B{i}"][0]
        layers.append({"W": init[f"W{i}"][0], "R": init[f"R{i}"][0], "b": b[: 4 * H] + b[4 * H :]})
        i += 1
    return {"layers": layers, "Wo": init["Wo"], "bo": init["bo"]}


class FeatureGolden(unittest.TestCase):
    def test_features_match(self):
        g = load("features.json")
        self.assertEqual(g["spec_version"], spec.SPEC["spec_version"])
        self.assertGreaterEqual(len(g["cases"]), 4)
        for c in g["cases"]:
            f, lvl = spec.features(c["history"])
            self.assertAlmostEqual(lvl, c["level"], places=9, msg=c["name"])
            np.testing.assert_allclose(f, np.array(c["features"], np.float32), atol=1e-6, err_msg=c["name"])

    def test_short_history_rejected(self):
        with self.assertRaises(ValueError):
            spec.features([1.0] * (spec.MIN_HISTORY - 1))

    def test_resample_golden(self):
        g = load("resample.json")
        got = data.resample(np.array(g["t"]), np.array(g["mbps"]))
        np.testing.assert_allclose(got, g["bins"], atol=1e-12)


class NodeSamples(unittest.TestCase):
    def test_store_format_is_read_and_split_at_gaps(self):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "samples-00000000000000000000.csv")
            rows = ["t_unix_ms,mbps,rtt_ms,loss"]
            rows += [f"{1000 + i * 5000},{i + 1.5},40.5,0" for i in range(5)]
            rows += [f"{1000 + 60000 + i * 5000},{i},," for i in range(3)]  # after a 40 s gap
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(rows) + "\n")
            t = data.read_node_samples(path)
            self.assertEqual([len(v) for v in t.values()], [5, 3])
            self.assertEqual(list(t.values())[0][0], 1.5)
            self.assertEqual(data.source_of(list(t)[0]), "node")


class ModelGolden(unittest.TestCase):
    def test_numpy_forward_of_exported_weights(self):
        g = load("model.json")
        p = params_from_onnx(MODEL)
        for c in g["cases"]:
            y = lstm.forward_numpy(p, np.array(c["features"], np.float32)[None])[0]
            np.testing.assert_allclose(y, c["output"], atol=g["tolerance"], err_msg=c["name"])
            mean, p10 = spec.postprocess(y, c["level"])
            np.testing.assert_allclose(mean, c["mean_mbps"], rtol=1e-3)
            np.testing.assert_allclose(p10, c["p10_mbps"], rtol=1e-3)
            self.assertTrue(np.all(p10 <= mean))

    def test_onnx_reference_evaluator_runs_the_graph(self):
        from onnx.reference import ReferenceEvaluator

        g = load("model.json")
        ev = ReferenceEvaluator(MODEL)
        for c in g["cases"]:
            (y,) = ev.run(None, {"x": np.array(c["features"], np.float32)[None]})
            np.testing.assert_allclose(y[0], c["output"], atol=g["tolerance"], err_msg=c["name"])

    def test_model_size_under_target(self):
        self.assertLessEqual(os.path.getsize(MODEL), 2 * 1024 * 1024)


if __name__ == "__main__":
    unittest.main()
