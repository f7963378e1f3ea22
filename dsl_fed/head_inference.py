"""An inference ``.tflite`` (raw audio in, probabilities out) from a trainable one and a head's weights, no TensorFlow.

A phone that personalised its head (`dsl_fed.personalize`) has LiteRT and the trainable file, not the converter.
The trainable file's ``embed`` subgraph already is the frozen front end with its weights as constants
(spectrogram layer + backbone); this module copies that subgraph into a model of its own and appends the head
with the given weights as constants, editing the flatbuffer with the schema `ai_edge_litert` ships:

    FULLY_CONNECTED(kernel1, bias1) -> PRELU(alpha / positive) -> FULLY_CONNECTED(positive * kernel2, bias2) -> SOFTMAX

which is the paper's Dense -> ARELU -> Dense(softmax) in inference mode (dropout off): ARELU is
``positive * relu(h) + negative * min(h, 0)`` with ``positive = 1 + sigmoid(beta)`` and ``negative =
clip(alpha, 0.01, 0.99)``, i.e. ``positive * prelu(h, negative / positive)``, and the factor ``positive`` moves into
the second kernel. All four are builtin ops, so the file runs wherever the trainable one does; its outputs equal
the trainable model's ``infer(embed(x))`` up to float32 rounding (`dsl_fed.personalize` checks that before writing).
The input keeps the trainable file's batch signature (any batch; `dsl_fed.litert.TFLiteRunner` feeds one chunk).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dsl_fed.errors import DslFedError
from dsl_fed.trainable_export import ALPHA_MAX, ALPHA_MIN

__all__ = ["inference_model"]

ROLES = {  # the head's weights by their role, as `dsl_fed.trainable_export` keys them (hidden_kernel, ...)
    "kernel1": "hidden_kernel", "bias1": "hidden_bias", "alpha": "arelu_alpha", "beta": "arelu_beta",
    "kernel2": "predictions_kernel", "bias2": "predictions_bias",
}
SIGNATURE_KEY, INPUT_NAME, OUTPUT_NAME = "serving_default", "audio", "probabilities"


def inference_model(trainable: bytes, weights: Mapping[str, np.ndarray]) -> bytes:
    """The trainable model's ``embed`` followed by the head with `weights` (its ``parameters()`` keys), as bytes.

    Raises:
        DslFedError: `trainable` has no ``embed`` signature, or `weights` lack a head weight or have shapes that
            do not chain (bottleneck -> hidden units -> classes).
    """
    from ai_edge_litert import schema_py_generated as schema
    import flatbuffers

    w = _head(weights)
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(trainable, 0))
    embed = next((s for s in model.signatureDefs or [] if _text(s.signatureKey) == "embed"), None)
    if embed is None:
        raise DslFedError("not a trainable dsl_fed model: it has no embed signature")
    graph = model.subgraphs[embed.subgraphIndex]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    graph.operators = [op for op in graph.operators if codes[op.opcodeIndex] != schema.BuiltinOperator.CALL_ONCE]
    bottleneck = graph.tensors[embed.outputs[0].tensorIndex]
    dim = int(bottleneck.shape[-1])
    if w["kernel1"].shape[0] != dim:
        raise DslFedError(f"weight hidden_kernel has {w['kernel1'].shape[0]} input rows; the model's bottleneck has {dim}")

    positive = 1.0 + 1.0 / (1.0 + np.exp(-w["beta"].astype(np.float64)))
    negative = np.clip(w["alpha"].astype(np.float64), ALPHA_MIN, ALPHA_MAX)
    units, classes = w["kernel1"].shape[1], w["kernel2"].shape[1]
    batch, signature = list(bottleneck.shape[:-1]), list(bottleneck.shapeSignature[:-1]) if bottleneck.shapeSignature is not None else None

    def tensor(name: str, shape: list[int], value: np.ndarray | None = None) -> int:
        t = schema.TensorT()
        t.name, t.type, t.shape = name.encode(), schema.TensorType.FLOAT32, shape
        if value is None:
            t.buffer = 0
            if signature is not None:
                t.shapeSignature = [*signature, shape[-1]]
        else:
            b = schema.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(value, dtype="<f4").tobytes(), dtype=np.uint8)
            model.buffers.append(b)
            t.buffer = len(model.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    def op(builtin: int, inputs: list[int], outputs: list[int], options_type: int = 0, options=None) -> None:
        o = schema.OperatorT()
        o.opcodeIndex = _opcode(model, schema, builtin)
        o.inputs, o.outputs = inputs, outputs
        o.builtinOptionsType, o.builtinOptions = options_type, options
        graph.operators.append(o)

    def dense(x: int, kernel: np.ndarray, bias: np.ndarray, name: str) -> int:
        options = schema.FullyConnectedOptionsT()
        options.fusedActivationFunction = schema.ActivationFunctionType.NONE
        out = tensor(name, [*batch, kernel.shape[1]])
        op(schema.BuiltinOperator.FULLY_CONNECTED,
           [x, tensor(f"{name}/kernel", list(kernel.T.shape), kernel.T), tensor(f"{name}/bias", [len(bias)], bias)],
           [out], schema.BuiltinOptions.FullyConnectedOptions, options)
        return out

    x = embed.outputs[0].tensorIndex
    h = dense(x, w["kernel1"], w["bias1"], "personal_head/hidden")
    a = tensor("personal_head/arelu", [*batch, units])
    slope = np.full(units, negative / positive, np.float32)
    op(schema.BuiltinOperator.PRELU, [h, tensor("personal_head/arelu/slope", [units], slope)], [a])
    logits = dense(a, (w["kernel2"].astype(np.float64) * positive).astype(np.float32), w["bias2"],
                   "personal_head/predictions")
    probs = tensor(OUTPUT_NAME, [*batch, classes])
    softmax = schema.SoftmaxOptionsT()
    softmax.beta = 1.0
    op(schema.BuiltinOperator.SOFTMAX, [logits], [probs], schema.BuiltinOptions.SoftmaxOptions, softmax)
    graph.outputs = [probs]
    graph.name = SIGNATURE_KEY.encode()

    signature_def = schema.SignatureDefT()
    signature_def.signatureKey, signature_def.subgraphIndex = SIGNATURE_KEY.encode(), 0
    signature_def.inputs = [_tensor_map(schema, INPUT_NAME, int(graph.inputs[0]))]
    signature_def.outputs = [_tensor_map(schema, OUTPUT_NAME, probs)]
    model.subgraphs, model.signatureDefs = [graph], [signature_def]
    _prune(model)
    builder = flatbuffers.Builder(len(trainable) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _head(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The six head weights by role, float32, with shapes that chain."""
    missing = sorted(key for key in ROLES.values() if key not in weights)
    if missing:
        raise DslFedError(f"head weights lack {', '.join(missing)} (expected {', '.join(sorted(ROLES.values()))})")
    w = {role: np.asarray(weights[key], dtype=np.float32) for role, key in ROLES.items()}
    k1, k2 = w["kernel1"], w["kernel2"]
    expected = {"kernel1": 2, "kernel2": 2, "bias1": 1, "bias2": 1, "alpha": 0, "beta": 0}
    for role, ndim in expected.items():
        if w[role].ndim != ndim:
            raise DslFedError(f"weight {ROLES[role]} must have {ndim} dimension(s), got shape {w[role].shape}")
    if w["bias1"].shape != (k1.shape[1],) or k2.shape[0] != k1.shape[1] or w["bias2"].shape != (k2.shape[1],):
        raise DslFedError(f"head weights do not chain: hidden_kernel {k1.shape}, hidden_bias {w['bias1'].shape}, "
                          f"predictions_kernel {k2.shape}, predictions_bias {w['bias2'].shape}")
    return w


def _opcode(model, schema, builtin: int) -> int:
    """Index of `builtin` among the model's operator codes (appended, version 1, when missing)."""
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _tensor_map(schema, name: str, index: int):
    m = schema.TensorMapT()
    m.name, m.tensorIndex = name.encode(), index
    return m


def _prune(model) -> None:
    """Drop the buffers and operator codes only the discarded subgraphs used (renumbering the rest)."""
    graph = model.subgraphs[0]
    used_codes = sorted({op.opcodeIndex for op in graph.operators})
    code_index = {old: new for new, old in enumerate(used_codes)}
    model.operatorCodes = [model.operatorCodes[i] for i in used_codes]
    for op in graph.operators:
        op.opcodeIndex = code_index[op.opcodeIndex]
    metadata = list(model.metadata or [])
    used = sorted({0} | {t.buffer for t in graph.tensors} | {m.buffer for m in metadata})
    buffer_index = {old: new for new, old in enumerate(used)}
    model.buffers = [model.buffers[i] for i in used]
    for t in graph.tensors:
        t.buffer = buffer_index[t.buffer]
    for m in metadata:
        m.buffer = buffer_index[m.buffer]


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
