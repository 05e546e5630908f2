"""Tiny DIS foreground models built in code: an ONNX graph with a known closed-form output, and the
red/blue image it separates.

The graph is a 1x1 convolution computing ``gain * (red - blue)`` on the preprocessed pixels, followed
by a sigmoid, so red pixels are foreground (``sigmoid(4) = 0.982``) and blue ones background
(``sigmoid(-4) = 0.018``) with the default weights.
"""

from __future__ import annotations

import numpy as np
import pytest

#: Conv gain of the default weights: red pixel -> sigmoid(4) = 0.982, blue pixel -> sigmoid(-4) = 0.018.
DIS_GAIN = 4.0


def save_dis_model(path, size: int = 32, weights=(DIS_GAIN, 0.0, -DIS_GAIN), symbolic: bool = False) -> str:
    """Write the tiny ONNX model to ``path`` and return ``str(path)``.

    Graph: ``image`` (1, 3, S, S) float -> Conv 1x1 (``weights`` per RGB channel, no bias) -> Sigmoid
    -> ``mask`` (1, 1, S, S), with ``S = size``; ``symbolic=True`` declares (N, 3, H, W) -> (N, 1, H, W)
    instead. Skips the calling test when ``onnx`` is not installed.
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    dims_in = ["N", 3, "H", "W"] if symbolic else [1, 3, size, size]
    dims_out = ["N", 1, "H", "W"] if symbolic else [1, 1, size, size]
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], list(weights))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["logit"], kernel_shape=[1, 1]),
         helper.make_node("Sigmoid", ["logit"], ["mask"])],
        "tiny_dis",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims_in)],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, dims_out)],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def red_blue_image(h: int, w: int) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 image: columns ``[0, w // 2)`` pure red (the model's foreground), the
    rest pure blue (background)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2, 0] = 255  # left half red
    img[:, w // 2 :, 2] = 255  # right half blue
    return img
