"""An ONNX face network as a torch module, so an insightface teacher runs on the training device under its autocast.

Why a converter of our own: the maintained one (onnx2torch) imports torchvision for two detection ops, and a
torchvision wheel does not import beside the CPU build of torch this project installs. Face recognition graphs use a
small set of operators (what arcface_torch's, insightface's and `kd-plugin export`'s files hold: convolutions, batch
norm, PReLU/ReLU/Clip, element-wise arithmetic, Flatten/Reshape, Gemm/MatMul, the Slice of a BGR swap), so the module below interprets the
graph node by node with torch functions. A graph with any other operator is refused by name (`UnsupportedGraph`);
the caller then falls back to onnxruntime (see `kd_plugin.teachers.spec.load_embedder`).

Everything computable without the input (initialisers, Constant nodes and what only they feed) is folded once when
the module is built. Shapes are kept as Python ints (Shape, Gather, Unsqueeze, Concat of shapes), so a forward makes
no host synchronisation. A Reshape whose constant target starts with the graph's fixed batch size (a file exported
for batch 1) keeps the running batch instead; the caller's check against onnxruntime proves the result.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd_plugin.errors import KDPluginError


class UnsupportedGraph(KDPluginError):
    """The graph holds something this converter does not interpret (named in the message)."""


class _Shape(tuple):
    """A shape, or part of one, held as Python ints (never a device tensor)."""


def _on_host(value):
    """A small constant as Python numbers: a float or int scalar, or a `_Shape` of ints (read once, at build)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return float(value) if value.numel() == 1 else value
    return int(value) if value.dim() == 0 else _Shape(int(v) for v in value.tolist())


def _attributes(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _binary(fn):
    def run(node, attrs, a, b):
        if isinstance(a, _Shape) or isinstance(b, _Shape):
            a = torch.tensor(list(a)) if isinstance(a, _Shape) else a
            b = torch.tensor(list(b)) if isinstance(b, _Shape) else b
        # a constant follows the activation's precision (fp16 under autocast), as a compiled graph would
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point() \
                and b.is_floating_point() and a.dtype != b.dtype:
            if a.numel() >= b.numel():
                b = b.to(a.dtype)
            else:
                a = a.to(b.dtype)
        return fn(a, b)
    return run


def _conv(node, attrs, x, w, b=None):
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise UnsupportedGraph(f"Conv {node.name!r}: auto_pad={attrs['auto_pad']!r} (only explicit pads are read)")
    dims = w.dim() - 2
    pads = list(attrs.get("pads", [0] * 2 * dims))
    begin, end = pads[:dims], pads[dims:]
    if begin != end:  # asymmetric: pad first (ONNX order: all begins, then all ends; F.pad: last dim first)
        x = F.pad(x, [p for d in reversed(range(dims)) for p in (begin[d], end[d])])
        begin = [0] * dims
    conv = F.conv2d if dims == 2 else F.conv1d
    return conv(x, w, b, stride=attrs.get("strides", 1), padding=begin, dilation=attrs.get("dilations", 1),
                groups=attrs.get("group", 1))


def _batch_norm(node, attrs, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


def _prelu(node, attrs, x, slope):
    slope = slope.to(x.dtype)
    if x.dim() >= 2 and slope.numel() == x.shape[1] and (slope.dim() == 1 or slope.shape[0] == x.shape[1]):
        return F.prelu(x, slope.reshape(-1))  # one slope per channel: torch's own kernel
    return torch.where(x >= 0, x, x * slope)


def _clip(node, attrs, x, low=None, high=None):
    low = attrs.get("min") if low is None else low  # opset < 11 keeps them as attributes
    high = attrs.get("max") if high is None else high
    return x.clamp(low, high)


def _gemm(node, attrs, a, b, c=None):
    a = a.transpose(-1, -2) if attrs.get("transA", 0) else a
    b = b.transpose(-1, -2) if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b.to(a.dtype))
    return out if c is None else out + attrs.get("beta", 1.0) * c.to(out.dtype)


def _flatten(node, attrs, x):
    axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _reshape(node, attrs, x, shape, fixed_batch=None):
    target = [int(s) for s in shape]
    if fixed_batch and len(target) >= 2 and target[0] == fixed_batch:
        target[0] = x.shape[0]  # a batch-1 export: keep the batch the module is given
    target = [x.shape[i] if s == 0 and not attrs.get("allowzero", 0) else s for i, s in enumerate(target)]
    return x.reshape(target)


def _pool(kind):
    def run(node, attrs, x):
        kernel, strides = attrs["kernel_shape"], attrs.get("strides", 1)
        pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
        if pads[:len(kernel)] != pads[len(kernel):]:
            raise UnsupportedGraph(f"{node.op_type} {node.name!r}: asymmetric pads {pads}")
        if kind == "max":
            return F.max_pool2d(x, kernel, strides, pads[:len(kernel)], ceil_mode=bool(attrs.get("ceil_mode", 0)))
        return F.avg_pool2d(x, kernel, strides, pads[:len(kernel)], ceil_mode=bool(attrs.get("ceil_mode", 0)),
                            count_include_pad=bool(attrs.get("count_include_pad", 0)))
    return run


def _shape(node, attrs, x):
    return _Shape(int(s) for s in x.shape)


def _gather(node, attrs, data, index):
    if isinstance(data, _Shape):
        return data[index] if isinstance(index, int) else _Shape(data[i] for i in index)
    if not isinstance(index, torch.Tensor):  # a constant index into a tensor: rare in face graphs
        index = torch.tensor(index if isinstance(index, int) else list(index), device=data.device)
    return torch.index_select(data, attrs.get("axis", 0), index.reshape(-1).long()).reshape(
        *data.shape[:attrs.get("axis", 0)], *index.shape, *data.shape[attrs.get("axis", 0) + 1:])


def _unsqueeze(node, attrs, x, axes=None):
    axes = [int(a) for a in (attrs["axes"] if axes is None else axes)]
    if isinstance(x, int):
        return _Shape([x])
    for a in sorted(a + x.dim() + len(axes) if a < 0 else a for a in axes):
        x = x.unsqueeze(a)
    return x


def _concat(node, attrs, *parts):
    if all(isinstance(p, (int, _Shape)) or (isinstance(p, torch.Tensor) and p.dim() <= 1 and not p.is_floating_point())
           for p in parts) and any(isinstance(p, _Shape) for p in parts):
        out = []
        for p in parts:
            out.extend([p] if isinstance(p, int) else [int(v) for v in p])
        return _Shape(out)
    return torch.cat(parts, dim=attrs["axis"])


def _slice(node, attrs, x, starts=None, ends=None, axes=None, steps=None):
    starts = attrs["starts"] if starts is None else starts  # opset < 10 keeps them as attributes
    ends = attrs["ends"] if ends is None else ends
    axes = attrs.get("axes", range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x.shape[axis]
        if step == -1 and start in (-1, size - 1) and end <= -size - 1:  # the whole axis reversed (BGR <-> RGB)
            x = x.flip(axis)
        elif step > 0:
            begin, stop = (max(0, min(v + size if v < 0 else v, size)) for v in (start, end))
            x = x.narrow(axis, begin, max(0, stop - begin))[(slice(None),) * axis + (slice(None, None, step),)]
        else:
            raise UnsupportedGraph(f"Slice {node.name!r}: step {step} over part of an axis")
    return x


def _cast(node, attrs, x):
    from onnx import helper
    dtype = torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(attrs["to"]))).dtype
    if isinstance(x, _Shape):
        return x
    if dtype.is_floating_point and x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return x  # under autocast a float cast would undo the low precision the teacher runs in
    return x.to(dtype)


OPS = {
    "Conv": _conv, "BatchNormalization": _batch_norm, "PRelu": _prelu, "Clip": _clip, "Gemm": _gemm,
    "Relu": lambda n, a, x: F.relu(x), "Sigmoid": lambda n, a, x: torch.sigmoid(x),
    "LeakyRelu": lambda n, a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(torch.div),
    "MatMul": _binary(torch.matmul), "Flatten": _flatten, "Reshape": _reshape, "Shape": _shape, "Gather": _gather,
    "Unsqueeze": _unsqueeze, "Concat": _concat, "Cast": _cast, "Slice": _slice,
    "Transpose": lambda n, a, x: x.permute(*a["perm"]) if "perm" in a else x.permute(*reversed(range(x.dim()))),
    "Identity": lambda n, a, x: x, "Dropout": lambda n, a, x, *rest: x,
    "GlobalAveragePool": lambda n, a, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
}


class OnnxGraphModule(nn.Module):
    """`forward(x) -> first graph output` for an ONNX graph made of the operators in `OPS`; its weights are buffers
    (a frozen teacher: nothing here trains), so `.to(device)` moves them all."""

    def __init__(self, model, source: str = "") -> None:
        super().__init__()
        from onnx import numpy_helper

        graph, self.source = model.graph, source or "ONNX graph"
        unknown = sorted({n.op_type for n in graph.node if n.op_type not in OPS and n.op_type != "Constant"})
        if unknown:
            raise UnsupportedGraph(f"{self.source}: operators {', '.join(unknown)} are not converted to torch")
        known = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in known]
        if len(inputs) != 1:
            raise UnsupportedGraph(f"{self.source}: expected one image input, found {len(inputs)}")
        self.input_name, self.output_name = inputs[0].name, graph.output[0].name
        batch = inputs[0].type.tensor_type.shape.dim[0] if inputs[0].type.tensor_type.shape.dim else None
        self.fixed_batch = batch.dim_value if batch is not None and batch.HasField("dim_value") else None
        from onnx import TensorProto
        # a uint8 input (kd-plugin export's "uint8" format) normalises inside the graph: fed the images as they are
        self.takes_uint8 = inputs[0].type.tensor_type.elem_type == TensorProto.UINT8
        constants = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
        self.steps = []  # (node, attributes, input names, output names) of what depends on the input
        for node in graph.node:
            attrs = _attributes(node)
            if node.op_type == "Constant":
                constants[node.output[0]] = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
            elif all(name in constants or name == "" for name in node.input):  # folded now, on the CPU
                result = self._run(node, attrs, [constants.get(name) for name in node.input])
                constants[node.output[0]] = result
            else:
                self.steps.append((node, attrs, list(node.input), list(node.output)))
        used = {name for _, _, names, _ in self.steps for name in names}
        self.host_values, self.slots = {}, {}
        for index, (name, value) in enumerate(sorted(constants.items())):
            if name not in used:
                continue
            if isinstance(value, torch.Tensor) and value.dim() <= 1 and not value.is_floating_point():
                self.host_values[name] = value  # shapes, axes, indices: read on the host, never moved
            elif isinstance(value, torch.Tensor):
                slot = f"c{index}"
                value = value.float() if value.is_floating_point() else value
                if value.dim() == 4:  # convolution weights: channels-last, as the input (1.4-1.7x faster on a CPU)
                    value = value.contiguous(memory_format=torch.channels_last)
                self.register_buffer(slot, value)
                self.slots[name] = slot
            else:
                self.host_values[name] = value
        for node, _, names, _ in self.steps:  # Clip bounds and Reshape targets are host numbers
            if node.op_type in ("Clip", "Reshape", "Unsqueeze", "Slice"):
                for name in names[1:]:
                    if name in self.slots:
                        self.host_values[name] = getattr(self, self.slots.pop(name))
        self.host_values = {name: _on_host(value) for name, value in self.host_values.items()}
        # each value is dropped after the last step that reads it (an unread one right away): a forward holds the live
        # values only, not every activation of the graph until it returns
        last_read = {name: i for i, (_, _, names, _) in enumerate(self.steps) for name in names}
        self.release: list[list[str]] = [[] for _ in self.steps]
        for i, (_, _, _, outputs) in enumerate(self.steps):
            if outputs[0] not in last_read and outputs[0] != self.output_name:
                self.release[i].append(outputs[0])
        for name, i in last_read.items():
            if name != self.output_name:
                self.release[i].append(name)

    def _run(self, node, attrs, values):
        while values and values[-1] is None:
            values = values[:-1]
        if node.op_type == "Reshape":
            return _reshape(node, attrs, values[0], _on_host(values[1]), self.fixed_batch)
        try:
            return OPS[node.op_type](node, attrs, *values)
        except UnsupportedGraph:
            raise
        except Exception as exc:
            raise UnsupportedGraph(f"{self.source}: node {node.name!r} ({node.op_type}) failed in torch: {exc}") from exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        values = {self.input_name: x}
        for (node, attrs, names, outputs), release in zip(self.steps, self.release):
            args = []
            for name in names:
                if name == "":
                    args.append(None)
                elif name in values:
                    args.append(values[name])
                elif name in self.slots:
                    args.append(getattr(self, self.slots[name]))
                else:
                    args.append(self.host_values[name])
            values[outputs[0]] = self._run(node, attrs, args)
            for name in release:
                values.pop(name, None)
        return values[self.output_name]


def load_graph_module(path: str) -> OnnxGraphModule:
    """The torch module of an ONNX file; `UnsupportedGraph` names what cannot be converted."""
    import onnx
    return OnnxGraphModule(onnx.load(path), source=path)
