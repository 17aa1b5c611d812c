"""ONNX model files, checked before onnxruntime opens them: a ``.onnx`` may come from anyone.

An ONNX file is a protobuf, not a program, but two of its features reach beyond the graph:

- **external data**: a tensor's bytes may live in another file, named by the tensor's
  ``location`` entry. A crafted model could name ``../../home/you/.ssh/id_rsa`` or an absolute
  path and have the runtime read that file into a weight (and its values into the outputs).
  Every location must be a relative path that stays inside the model's own directory, with
  symbolic links followed.
- **operator domains**: a node outside the standard ONNX domain runs a custom kernel, from a
  shared library registered with the session or from the runtime's own contrib set
  (``com.microsoft``). Only the standard domain is accepted (``""``/``ai.onnx``: the
  operators of the ONNX specification), which is all our exports use.

Both are checked in the main graph, every subgraph (the bodies of ``If``/``Loop``/``Scan``)
and every model-local function, with the ``onnx`` package and without reading any external
data, before :class:`passl.deploy.onnx_runtime.OnnxEngine` creates a session.

An ONNX export directory (``tools/export_model.py --format onnx``) holds ``model.onnx`` and
the same ``inference.yml`` as a Paddle export (:mod:`passl.io.inference_model`).
"""
import os

from passl.errors import UserError
from passl.io.inference_model import META_FILE, read_meta

ONNX_FILE = "model.onnx"
#: the domains of the operators in the ONNX specification
STANDARD_DOMAINS = ("", "ai.onnx")
INSTALL_HINT = 'pip install -e ".[onnx]" (paddle2onnx, onnxruntime, onnx)'


def is_onnx_dir(directory):
    """True when ``directory`` holds an ONNX export (``model.onnx``)."""
    return os.path.isfile(os.path.join(directory, ONNX_FILE))


def read_onnx_dir(directory):
    """``(model.onnx path, meta dict)`` of an ONNX export directory, the model checked by
    :func:`check_onnx_model`; problems are one-line UserErrors."""
    path, meta_path = os.path.join(directory, ONNX_FILE), os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise UserError(f"model dir {directory}: no {META_FILE} beside {ONNX_FILE}; export "
                        f"with tools/export_model.py ... --format onnx")
    check_onnx_model(path)
    return path, read_meta(directory, (path,))


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError(f"reading ONNX models needs the onnx package, which is not "
                        f"installed: {INSTALL_HINT}") from None
    return onnx


def _subgraphs(node):
    """Graphs held by ``node``'s attributes (If branches, Loop/Scan bodies)."""
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def _attribute_tensors(node):
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        for sparse in attribute.sparse_tensors:
            yield sparse.values
            yield sparse.indices


def _walk(model):
    """``(nodes, tensors)`` of the main graph, every subgraph and every local function."""
    nodes, tensors, pending = [], [], [model.graph]
    for function in model.functions:
        nodes.extend(function.node)
        for node in function.node:
            pending.extend(_subgraphs(node))
    while pending:
        graph = pending.pop()
        nodes.extend(graph.node)
        tensors.extend(graph.initializer)
        for sparse in graph.sparse_initializer:
            tensors.extend((sparse.values, sparse.indices))
        for node in graph.node:
            pending.extend(_subgraphs(node))
    for node in nodes:
        tensors.extend(_attribute_tensors(node))
    return nodes, tensors


def _outside(directory, location):
    """Why the external-data ``location`` escapes ``directory`` (realpath), or None."""
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
        return "an absolute path" if location else "an empty path"
    target = os.path.realpath(os.path.join(directory, location))
    if os.path.commonpath([target, directory]) != directory:
        return f"outside the model's directory ({target})"
    return None


def check_onnx_model(path):
    """Refuse ``path`` unless it is an ONNX model whose external data stays inside its
    directory and whose operators are all of the standard domain (see module docstring).

    Raises:
        UserError: one line naming the file, what was found and why it is refused.
    """
    onnx = _import_onnx()
    what = f"ONNX model {path}"
    if not os.path.isfile(path):
        raise UserError(f"{what}: file not found")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{what}: not an ONNX model ({type(e).__name__})") from None
    if not model.graph.node or not model.graph.output:
        raise UserError(f"{what}: not an ONNX model (no graph)")
    foreign = sorted({opset.domain for opset in model.opset_import
                      if opset.domain not in STANDARD_DOMAINS})
    nodes, tensors = _walk(model)
    foreign_ops = sorted({f"{node.domain}.{node.op_type}" for node in nodes
                          if node.domain not in STANDARD_DOMAINS})
    if foreign or foreign_ops:
        listed = ", ".join(foreign_ops or foreign)
        raise UserError(f"{what}: refused: operators outside the standard ONNX domain "
                        f"({listed}) would run custom kernels; only standard ONNX operators "
                        f"are run here")
    # the runtime joins locations to the folder the model is opened from (not to where a
    # symlinked model file points)
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data
                         if entry.key == "location"), "")
        reason = _outside(directory, location)
        if reason:
            raise UserError(f"{what}: refused: tensor {tensor.name!r} reads its data from "
                            f"{location!r}, {reason}; external data must be files inside "
                            f"the model's directory")
