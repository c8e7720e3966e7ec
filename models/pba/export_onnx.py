"""Build the ONNX graph from trained weights with onnx.helper (opset 17).

x [1, 60, C] -> Transpose(1,0,2) -> LSTM (one per layer, layout 0, gates iofc)
-> Y_h of the last layer -> Squeeze(0) -> Gemm -> y [1, n_out].
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(params, window, channels, n_out, doc=""):
    nodes, inits = [], []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, window, channels])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])
    nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]))
    cur = "xt"
    n_layers = len(params["layers"])
    for li, layer in enumerate(params["layers"]):
        W = np.asarray(layer["W"], np.float32)[None]
        R = np.asarray(layer["R"], np.float32)[None]
        H = R.shape[2]
        b = np.concatenate([np.asarray(layer["b"], np.float32), np.zeros(4 * H, np.float32)])[None]
        inits += [
            numpy_helper.from_array(W, f"W{li}"),
            numpy_helper.from_array(R, f"R{li}"),
            numpy_helper.from_array(b, f"B{li}"),
        ]
        last = li == n_layers - 1
        outs = ["", f"h{li}"] if last else [f"Y{li}"]
        nodes.append(
            helper.make_node("LSTM", [cur, f"W{li}", f"R{li}", f"B{li}"], outs, hidden_size=H, layout=0)
        )
        if not last:
            # Y [T, 1, B, H] -> [T, B, H]
            inits.append(numpy_helper.from_array(np.array([1], np.int64), f"ax1_{li}"))
            nodes.append(helper.make_node("Squeeze", [f"Y{li}", f"ax1_{li}"], [f"Ys{li}"]))
            cur = f"Ys{li}"
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "ax0"))
    nodes.append(helper.make_node("Squeeze", [f"h{n_layers - 1}", "ax0"], ["hl"]))
    inits.append(numpy_helper.from_array(np.asarray(params["Wo"], np.float32), "Wo"))
    inits.append(numpy_helper.from_array(np.asarray(params["bo"], np.float32), "bo"))
    nodes.append(helper.make_node("Gemm", ["hl", "Wo", "bo"], ["y"], transB=1))
    graph = helper.make_graph(nodes, "pba_lstm", [x], [y], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dwcp-models", doc_string=doc
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
