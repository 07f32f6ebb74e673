"""YOLOv4-tiny's Darknet files to the int8 ONNX model the worker runs.

    python yolo-onnx.py CFG WEIGHTS CALIBRATION_TARBALL OUT.onnx

Run by scripts/fetch-model inside its pinned tool environment (onnx, numpy,
onnxruntime's quantiser, OpenCV for the calibration images); not meant to be
run by hand.

1. The Darknet network becomes an ONNX graph: each convolution with its batch
   normalisation folded into the weights and bias, leaky ReLU (0.1), the
   channel-split routes (Slice), concatenations, 2x2 max pooling and nearest
   upsampling. The input is `images`, 1x3xHxW, RGB scaled to 0-1 (H and W
   any multiple of 32); each [yolo] layer's input, the raw 255-channel head
   convolution, is an output (`head0` at 1/32 of the input, `head1` at 1/16).
   Decoding the boxes (sigmoid, anchors, scale_x_y) is the detector's job.
2. The graph is quantised to int8 (QDQ, per-channel weights, unsigned 8-bit
   activations) with activation ranges from OpenCV's sample images at 416x416
   (min/max). The convolutions after the last max pooling, on the 13x13 and
   26x26 grids, decide the scores and stay in float: that keeps the detections
   close to the float network's (quantising them too saved a tenth of the time
   and lost a fifth of the frames that agree with the float network).
"""
import os
import sys
import tarfile
import tempfile

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                      QuantFormat, QuantType, quantize_static)

CALIBRATION_SIZE = 416


def sections(path):
    out = []
    for raw in open(path):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("["):
            out.append((line[1:-1].strip(), {}))
        elif out:
            key, value = line.split("=", 1)
            out[-1][1][key.strip()] = value.strip()
    return out


def darknet_to_onnx(cfg, weights):
    """The float ONNX model and the names of the convolutions to keep in float."""
    layers = sections(cfg)[1:]
    data = open(weights, "rb").read()
    major, minor, _ = np.frombuffer(data[:12], dtype=np.int32)
    values = np.frombuffer(data[12 + (8 if major * 10 + minor >= 2 else 4):], dtype=np.float32)
    pos = 0

    def take(n):
        nonlocal pos
        part = values[pos:pos + n]
        if len(part) != n:
            sys.exit(f"yolo-onnx: {weights} ends early (truncated, or not this .cfg's weights)")
        pos += n
        return part

    nodes, inits, heads, float_convs = [], [], [], []
    names, channels = [], []
    last_pool = max(i for i, (kind, _) in enumerate(layers) if kind == "maxpool")

    def const(name, array):
        inits.append(numpy_helper.from_array(array, name))
        return name

    for i, (kind, p) in enumerate(layers):
        prev, prev_c = (names[-1], channels[-1]) if names else ("images", 3)
        t = f"l{i}"
        if kind == "convolutional":
            f, k, s = int(p["filters"]), int(p["size"]), int(p["stride"])
            pad = k // 2 if int(p.get("pad", 0)) else int(p.get("padding", 0))
            bias = take(f).astype(np.float32)
            bn = int(p.get("batch_normalize", 0))
            if bn:
                scale, mean, var = take(f), take(f), take(f)
            kernel = take(f * prev_c * k * k).reshape(f, prev_c, k, k).astype(np.float32)
            if bn:
                g = scale / np.sqrt(var + 1e-5)
                kernel = kernel * g[:, None, None, None]
                bias = bias - mean * g
            act = p.get("activation", "linear")
            out = t if act == "linear" else t + "_conv"
            nodes.append(helper.make_node(
                "Conv", [prev, const(t + "_w", kernel), const(t + "_b", bias.astype(np.float32))],
                [out], name=t + "_conv", kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4))
            if i > last_pool:
                float_convs.append(t + "_conv")
            if act == "leaky":
                nodes.append(helper.make_node("LeakyRelu", [out], [t], name=t + "_leaky", alpha=0.1))
            elif act != "linear":
                sys.exit(f"yolo-onnx: {cfg}: activation {act} is not supported")
            names.append(t)
            channels.append(f)
        elif kind == "route":
            idx = [int(x) for x in p["layers"].split(",")]
            idx = [x if x >= 0 else i + x for x in idx]
            groups, gid = int(p.get("groups", 1)), int(p.get("group_id", 0))
            if len(idx) == 1 and groups == 1:
                names.append(names[idx[0]])
                channels.append(channels[idx[0]])
            elif len(idx) == 1:
                c = channels[idx[0]] // groups
                nodes.append(helper.make_node(
                    "Slice", [names[idx[0]], const(t + "_s", np.array([gid * c], np.int64)),
                              const(t + "_e", np.array([(gid + 1) * c], np.int64)),
                              const(t + "_a", np.array([1], np.int64))], [t], name=t + "_slice"))
                names.append(t)
                channels.append(c)
            else:
                nodes.append(helper.make_node("Concat", [names[j] for j in idx], [t], name=t + "_concat", axis=1))
                names.append(t)
                channels.append(sum(channels[j] for j in idx))
        elif kind == "maxpool":
            k, s = int(p["size"]), int(p["stride"])
            nodes.append(helper.make_node("MaxPool", [prev], [t], name=t + "_pool", kernel_shape=[k, k], strides=[s, s]))
            names.append(t)
            channels.append(prev_c)
        elif kind == "upsample":
            s = float(p["stride"])
            nodes.append(helper.make_node(
                "Resize", [prev, "", const(t + "_scale", np.array([1, 1, s, s], np.float32))], [t],
                name=t + "_upsample", mode="nearest"))
            names.append(t)
            channels.append(prev_c)
        elif kind == "yolo":
            heads.append(prev)
            names.append(prev)
            channels.append(prev_c)
        else:
            sys.exit(f"yolo-onnx: {cfg}: layer [{kind}] is not supported")
    if pos != len(values):
        sys.exit(f"yolo-onnx: {weights} has {len(values) - pos} values more than {cfg} needs (another model?)")
    outputs = []
    for j, h in enumerate(heads):
        nodes.append(helper.make_node("Identity", [h], [f"head{j}"], name=f"head{j}"))
        outputs.append(helper.make_tensor_value_info(f"head{j}", TensorProto.FLOAT, [1, None, None, None]))
    graph = helper.make_graph(
        nodes, "yolov4-tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, float_convs


class SampleImages(CalibrationDataReader):
    """OpenCV's sample images (samples/data/*.jpg of its source tarball)."""

    def __init__(self, tarball):
        self.blobs = []
        with tarfile.open(tarball) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                parts = member.name.split("/")
                if member.isfile() and parts[-1].endswith(".jpg") and parts[-3:-1] == ["samples", "data"]:
                    raw = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                    image = cv2.imdecode(raw, cv2.IMREAD_COLOR)
                    if image is not None:
                        self.blobs.append(cv2.dnn.blobFromImage(
                            image, 1 / 255.0, (CALIBRATION_SIZE, CALIBRATION_SIZE), swapRB=True, crop=False))
        if not self.blobs:
            sys.exit(f"yolo-onnx: {tarball} has no samples/data/*.jpg to calibrate with")
        self.left = iter(self.blobs)

    def get_next(self):
        blob = next(self.left, None)
        return None if blob is None else {"images": blob}


def main():
    cfg, weights, tarball, out = sys.argv[1:5]
    model, float_convs = darknet_to_onnx(cfg, weights)
    images = SampleImages(tarball)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        onnx.save(model, fp32)
        quantize_static(fp32, out, images, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=float_convs)
    print(f"yolo-onnx: {out}: int8 with {len(float_convs)} convolutions in float, "
          f"calibrated on {len(images.blobs)} images", file=sys.stderr)


if __name__ == "__main__":
    main()
