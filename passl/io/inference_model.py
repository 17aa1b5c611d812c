"""The exported-model directory: a static graph, its weights and ``inference.yml``.

``tools/export_model.py`` writes, and ``tools/predict.py`` (or any Paddle Inference user)
reads, one directory (``--format onnx`` writes ``model.onnx`` instead of the graph and
weights: :mod:`passl.io.onnx_model`)::

    model.json         the static graph (paddle.jit.save; ``model.pdmodel`` in old Paddle)
    model.pdiparams    its weights
    inference.yml      everything inference needs besides the graph, so no training config:

        kind: passl-inference-model
        version: 1
        output: features | logits      pooled backbone features [B, C], or class scores [B, K]
        input: {name: images, shape: [-1 or B, 3, H, W], dtype: float32}
        transforms: [...]              passl.data.transforms blocks, applied to HWC uint8 RGB
                                       images and ending in a float32 CHW array of the input size
        class_names: [...]             index -> name (absent when the training set had none)
        sha256: {model.json: ..., model.pdiparams: ...}   the files as exported; predict
                                       refuses a graph or weights file that differs (a damaged
                                       copy); exports without it are read as before

The transforms are the training config's ``dataloader.val.dataset.transforms`` (what
``--evaluate-only`` feeds the model), so the exported model sees exactly those pixels.

A model directory is a program: Paddle Inference runs whatever operators its graph lists,
and some of them (``save``, ``load``, ``print``, Python callbacks) read or write files. So
before anything runs it, :func:`check_graph` reads the graph file as data (JSON or protobuf,
nothing executed) and refuses every operator outside the set our exporter writes, and
:func:`read_model_dir` checks ``inference.yml``'s values against bounds before anything is
allocated from them.
"""
import hashlib
import json
import os

import yaml

from passl.errors import UserError

KIND = "passl-inference-model"
VERSION = 1
MODEL_PREFIX = "model"
PARAMS_FILE = MODEL_PREFIX + ".pdiparams"
#: graph files paddle.jit.save writes: PIR (Paddle 3) first, the legacy ProgramDesc second
GRAPH_FILES = (MODEL_PREFIX + ".json", MODEL_PREFIX + ".pdmodel")
META_FILE = "inference.yml"
OUTPUTS = ("features", "logits")

#: Operators tools/export_model.py writes for every model it can export (a ResNet trunk,
#: NCHW or NHWC, any stem and pool size; features or features + linear classifier), by
#: graph format, with the inputs and outputs each takes: a count of each for PIR, the
#: arguments per slot for the older protobuf graphs. Paddle crashes on some operators wired
#: otherwise (e.g. a convolution without its filter) instead of refusing them.
#: tests/test_model_dir_safety.py exports each variant and checks it stays inside.
_ONE_IN_OUT = ({"X": 1}, {"Out": 1})
EXPORTED_OPS = {
    "pir": {"builtin.parameter": (0, 1), "pd_op.data": (0, 1), "pd_op.fetch": (1, 1),
            "pd_op.conv2d": (2, 1), "pd_op.batch_norm_": (5, 6), "pd_op.relu": (1, 1),
            "pd_op.add": (2, 1), "pd_op.pool2d": (2, 1), "pd_op.full_int_array": (0, 1),
            "pd_op.flatten": (1, 1), "pd_op.matmul": (2, 1), "pd_op.transpose": (1, 1),
            # a residual sum (resnet.residual_sum): its two inputs combined, then add_n
            "builtin.combine": (2, 1), "pd_op.add_n": (1, 1)},
    "legacy": {"feed": _ONE_IN_OUT, "fetch": _ONE_IN_OUT, "relu": _ONE_IN_OUT,
               "pool2d": _ONE_IN_OUT, "flatten_contiguous_range": _ONE_IN_OUT,
               "transpose2": _ONE_IN_OUT, "conv2d": ({"Input": 1, "Filter": 1}, {"Output": 1}),
               "elementwise_add": ({"X": 1, "Y": 1}, {"Out": 1}),
               "sum": ({"X": 2}, {"Out": 1}),
               "matmul_v2": ({"X": 1, "Y": 1}, {"Out": 1}),
               "batch_norm": ({"X": 1, "Scale": 1, "Bias": 1, "Mean": 1, "Variance": 1,
                               "MomentumTensor": 0},
                              {"Y": 1, "MeanOut": 1, "VarianceOut": 1, "SavedMean": 1,
                               "SavedVariance": 1})},
}
#: Operators that touch files, the console, the network or run Python: refused in every
#: graph, also under ``--trust-model`` (matched on the name after the dialect prefix).
IO_OPS = frozenset({"save", "load", "save_combine", "load_combine", "print", "py_func",
                    "pylayer", "send", "recv", "send_v2", "recv_v2", "listen_and_serv"})
#: PIR JSON writes an operator's dialect as a number (Paddle's DialectIdMap); ``p`` is
#: ``builtin.parameter``.
_PIR_DIALECTS = {"0": "builtin", "1": "pd_op", "2": "cf", "3": "custom_op", "4": "dist_op"}

#: Bounds on inference.yml values, checked before anything is allocated from them.
MAX_BATCH = 1024
MAX_SIDE = 4096
MAX_BATCH_BYTES = 2 ** 30
MAX_META_BYTES = 2 ** 20


def model_prefix(directory):
    """The path prefix ``paddle.jit.save`` writes to inside ``directory``."""
    return os.path.join(directory, MODEL_PREFIX)


def write_meta(directory, output, input_shape, transforms, class_names=None, input_name="images"):
    """Write ``inference.yml`` (see the module docstring); returns its path."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    meta = {"kind": KIND, "version": VERSION, "output": output,
            "input": {"name": input_name, "shape": [int(d) for d in input_shape],
                      "dtype": "float32"},
            "transforms": list(transforms)}
    if class_names is not None:
        meta["class_names"] = [str(name) for name in class_names]
    meta["sha256"] = {name: file_sha256(os.path.join(directory, name))
                      for name in sorted(os.listdir(directory))
                      if name != META_FILE and os.path.isfile(os.path.join(directory, name))}
    path = os.path.join(directory, META_FILE)
    with open(path, "w") as f:
        yaml.safe_dump(meta, f, sort_keys=False, default_flow_style=None)
    return path


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sums(sums, paths, meta_path):
    """The graph and weights files are the ones exported: their sha256 is the one
    ``inference.yml`` lists (when it lists any: older exports do not)."""
    if sums is None:
        return
    if not (isinstance(sums, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in sums.items())):
        raise UserError(f"{meta_path}: sha256 must map file names to hex digests; re-export "
                        f"the model")
    for path in paths:
        name = os.path.basename(path)
        if name not in sums:
            raise UserError(f"{meta_path}: sha256 does not list {name}; re-export the model")
        if file_sha256(path) != sums[name]:
            raise UserError(f"{path}: differs from the file exported (sha256 in {META_FILE}); "
                            f"a damaged or edited copy: copy or export the model again")


def _pir_operators(graph_file, data):
    """Operator names of a PIR JSON program: every entry of every ``ops`` list, at any depth
    (ops of nested blocks included), walked without recursion."""
    names, pending = [], [data]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key == "ops" and isinstance(value, list):
                    for op in value:
                        name = op.get("#") if isinstance(op, dict) else None
                        if not isinstance(name, str):
                            raise UserError(f"{graph_file}: an operator without a name; not a "
                                            f"graph tools/export_model.py writes; re-export "
                                            f"the model")
                        names.append(name)
                pending.append(value)
    return [_pir_full_name(name) for name in names]


def _pir_full_name(name):
    """``1.conv2d`` -> ``pd_op.conv2d``, ``p`` -> ``builtin.parameter`` (see _PIR_DIALECTS)."""
    if name == "p":
        return "builtin.parameter"
    dialect, dot, op = name.partition(".")
    return f"{_PIR_DIALECTS.get(dialect, dialect)}.{op}" if dot else name


def _legacy_program(graph_file, data):
    """A protobuf ProgramDesc (``.pdmodel``), parsed (nothing of it runs)."""
    from google.protobuf.message import DecodeError
    from paddle.base.proto import framework_pb2
    try:
        program = framework_pb2.ProgramDesc.FromString(data)
    except (DecodeError, RecursionError, ValueError) as e:
        raise UserError(f"{graph_file}: not a Paddle program ({type(e).__name__}); re-export "
                        f"the model") from None
    return program


def _pir_dataflow_problem(program):
    """What makes a PIR program other than the straight line of operators our exporter
    writes (one block; each value defined once, before it is used; one input, one output),
    or None. Paddle crashes on some such programs instead of refusing them."""
    regions = program.get("program", {}).get("regions") if isinstance(
        program.get("program"), dict) else None
    if not (isinstance(regions, list) and len(regions) == 1 and isinstance(regions[0], dict)
            and isinstance(regions[0].get("blocks"), list) and len(regions[0]["blocks"]) == 1
            and isinstance(regions[0]["blocks"][0], dict)
            and isinstance(regions[0]["blocks"][0].get("ops"), list)):
        return "not one block of operators"
    defined, ends = set(), {"1.data": 0, "1.fetch": 0}
    for op in regions[0]["blocks"][0]["ops"]:
        if "regions" in op:
            return f"operator {_pir_full_name(op['#'])!r} holds nested blocks"
        inputs, outputs = op.get("I", []), op.get("O", [])
        outputs = [outputs] if isinstance(outputs, dict) else outputs
        name = _pir_full_name(op["#"])
        if not (isinstance(inputs, list) and isinstance(outputs, list)) \
                or (len(inputs), len(outputs)) != EXPORTED_OPS["pir"].get(name, (-1, -1)):
            return f"operator {name!r} is wired with other inputs or outputs"
        values = [(v, "input") for v in inputs] + [(v, "output") for v in outputs]
        for value, role in values:
            number = value.get("%") if isinstance(value, dict) else None
            if not isinstance(number, int) or isinstance(number, bool):
                return f"operator {_pir_full_name(op['#'])!r} has a malformed {role}"
            if (role == "input") != (number in defined):
                return (f"operator {_pir_full_name(op['#'])!r} uses value %{number} before it "
                        f"is defined" if role == "input" else f"value %{number} is defined twice")
            defined.add(number)
        if op["#"] in ends:
            ends[op["#"]] += 1
    if list(ends.values()) != [1, 1]:
        return f"{ends['1.data']} input(s) and {ends['1.fetch']} output(s), not one each"
    return None


def _legacy_dataflow_problem(program):
    """As :func:`_pir_dataflow_problem` for a protobuf program: one block, every variable an
    operator reads or writes declared, one feed and one fetch."""
    if len(program.blocks) != 1:
        return "not one block of operators"
    block = program.blocks[0]
    declared = {var.name for var in block.vars}
    for op in block.ops:
        if not all(isinstance(slot.parameter, str) for slot in [*op.inputs, *op.outputs]):
            return f"operator {op.type!r} has a slot whose name is not text"
        wiring = [sorted((slot.parameter, len(slot.arguments)) for slot in slots)
                  for slots in (op.inputs, op.outputs)]
        expected = EXPORTED_OPS["legacy"].get(op.type, ({}, {}))
        if wiring != [sorted(counts.items()) for counts in expected]:
            return f"operator {op.type!r} is wired with other inputs or outputs"
        for slot in list(op.inputs) + list(op.outputs):
            unknown = [name for name in slot.arguments if name not in declared]
            if unknown:
                return f"operator {op.type!r} uses undeclared variable {unknown[0]!r}"
    types = [op.type for op in block.ops]
    if (types.count("feed"), types.count("fetch")) != (1, 1):
        return (f"{types.count('feed')} input(s) and {types.count('fetch')} output(s), not one "
                f"each")
    return None


def graph_operators(graph_file):
    """``(format, operator names)`` of a static graph file, read as data: ``pir`` for the
    JSON ``paddle.jit.save`` writes in Paddle 3, ``legacy`` for a protobuf ``.pdmodel``."""
    kind, names, _ = _read_graph(graph_file)
    return kind, names


def _read_graph(graph_file):
    """``(format, operator names, what breaks the straight-line shape or None)``."""
    try:
        with open(graph_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{graph_file}: cannot read ({e.strerror or e})") from None
    if not graph_file.endswith(".json"):
        program = _legacy_program(graph_file, data)
        names = [op.type for block in program.blocks for op in block.ops]
        if not all(isinstance(name, str) for name in names):  # not UTF-8 in the file
            raise UserError(f"{graph_file}: an operator name that is not text; not a Paddle "
                            f"program; re-export the model")
        return "legacy", names, _legacy_dataflow_problem(program)
    try:
        program = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{graph_file}: not valid JSON ({type(e).__name__}); re-export the "
                        f"model") from None
    if not isinstance(program, dict) or "program" not in program:
        raise UserError(f"{graph_file}: not a Paddle program (no 'program' key); re-export the "
                        f"model")
    names = _pir_operators(graph_file, program)
    return "pir", names, _pir_dataflow_problem(program)


def check_graph(graph_file, trust=False):
    """Refuse a graph that could do more than compute: one UserError naming the first
    operator outside :data:`EXPORTED_OPS` (any operator in :data:`IO_OPS`, whatever
    ``trust`` says), or what makes it other than a straight line of them (a value used
    before it is defined, nested blocks, not one input and one output). ``trust``
    (``--trust-model``) lets other graphs through, for a model made by another tool. Nothing
    of the graph runs here."""
    kind, names, problem = _read_graph(graph_file)
    for name in names:
        if name.rpartition(".")[2] in IO_OPS:
            raise UserError(f"{graph_file}: operator {name!r} reads or writes files, prints or "
                            f"runs Python; a model graph with it is refused, also with "
                            f"--trust-model")
    if trust:
        return
    allowed = EXPORTED_OPS[kind]
    for name in names:
        if name not in allowed:
            raise UserError(f"{graph_file}: operator {name!r} is not one tools/export_model.py "
                            f"writes, so this model is not run; re-export it with "
                            f"tools/export_model.py, or pass --trust-model if you trust who "
                            f"made it")
    if problem:
        raise UserError(f"{graph_file}: {problem}, unlike every graph tools/export_model.py "
                        f"writes, so this model is not run; re-export it, or pass "
                        f"--trust-model if you trust who made it")


def _graph_file(directory):
    for name in GRAPH_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def read_model_dir(directory):
    """``(graph file, params file, meta dict)`` of an exported model directory, with
    ``inference.yml`` checked against the bounds above (the graph is checked by whatever
    runs it: :class:`passl.deploy.engine.InferenceEngine` calls :func:`check_graph`).

    Anything missing, malformed or refused is a one-line UserError naming the path and the
    fix.
    """
    fix = "export one with tools/export_model.py -c CFG --load CKPT --output DIR"
    if not os.path.exists(directory):
        raise UserError(f"model dir {directory}: not found; {fix}")
    if not os.path.isdir(directory):
        raise UserError(f"model dir {directory}: a file, not the directory "
                        f"tools/export_model.py writes; {fix}")
    graph, params = _graph_file(directory), os.path.join(directory, PARAMS_FILE)
    meta_path = os.path.join(directory, META_FILE)
    missing = [name for name, path in ((" or ".join(GRAPH_FILES), graph), (PARAMS_FILE, params),
                                       (META_FILE, meta_path))
               if path is None or not os.path.isfile(path)]
    if missing:
        raise UserError(f"model dir {directory}: no {', '.join(missing)}; not an exported "
                        f"model; {fix}")
    return graph, params, read_meta(directory, (graph, params))


def read_meta(directory, exported_files=()):
    """The checked ``inference.yml`` of an export directory (Paddle or ONNX) as a dict; the
    ``exported_files`` (graph, weights) must have the sha256 it lists."""
    meta_path = os.path.join(directory, META_FILE)
    if os.path.getsize(meta_path) > MAX_META_BYTES:
        raise UserError(f"{meta_path}: {os.path.getsize(meta_path)} bytes, more than an "
                        f"inference.yml holds ({MAX_META_BYTES >> 20} MB at most); re-export "
                        f"the model")
    try:
        with open(meta_path) as f:
            meta = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{meta_path}: not valid YAML ({type(e).__name__}); re-export the "
                        f"model") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise UserError(f"{meta_path}: kind is not {KIND!r}; re-export the model")
    if not _is_int(meta.get("version", 0)):
        raise UserError(f"{meta_path}: version {meta['version']!r} is not an integer; "
                        f"re-export the model")
    if meta.get("version", 0) > VERSION:
        raise UserError(f"{meta_path}: version {meta['version']} is newer than this code "
                        f"reads ({VERSION}); update PASSL")
    for key in ("output", "input", "transforms"):
        if key not in meta:
            raise UserError(f"{meta_path}: key '{key}' missing; re-export the model")
    if meta["output"] not in OUTPUTS:
        raise UserError(f"{meta_path}: output {meta['output']!r} is not one of "
                        f"{', '.join(OUTPUTS)}; re-export the model")
    _check_input(meta["input"], meta_path)
    _check_transforms(meta["transforms"], meta_path)
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list)
                                  and all(isinstance(n, str) for n in names)):
        raise UserError(f"{meta_path}: class_names must be a list of strings; re-export the "
                        f"model")
    _check_sums(meta.get("sha256"), exported_files, meta_path)
    return meta


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_input(block, meta_path):
    """``input``: ``{name: str, shape: [B or -1, 3, H, W], dtype: float32}`` within the
    bounds at the top of this module (a batch of them at most MAX_BATCH_BYTES)."""
    where = f"{meta_path}: input"
    if not isinstance(block, dict) or not isinstance(block.get("name"), str):
        raise UserError(f"{where}: expected {{name, shape, dtype}}; re-export the model")
    if block.get("dtype") != "float32":
        raise UserError(f"{where}.dtype {block.get('dtype')!r}: only float32 is exported; "
                        f"re-export the model")
    shape = block.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(map(_is_int, shape))):
        raise UserError(f"{where}.shape {shape!r}: expected 4 integers [B or -1, 3, H, W]; "
                        f"re-export the model")
    batch, channels, height, width = shape
    if not (batch == -1 or 1 <= batch <= MAX_BATCH) or channels != 3 \
            or not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE) \
            or max(batch, 1) * channels * height * width * 4 > MAX_BATCH_BYTES:
        raise UserError(f"{where}.shape {shape}: outside what predict runs (batch -1 or "
                        f"1..{MAX_BATCH}, 3 channels, sides 1..{MAX_SIDE}, at most "
                        f"{MAX_BATCH_BYTES >> 20} MB a batch); re-export the model")


def _check_transforms(blocks, meta_path):
    """``transforms``: blocks ``{name: str, key: number, string or list of them}`` whose
    numbers (sizes, kernel sizes, sigmas) are at most MAX_SIDE: a transform cannot be told
    to allocate more than an image of the largest input size."""
    where = f"{meta_path}: transforms"
    if not isinstance(blocks, list) or not blocks:
        raise UserError(f"{where}: expected a list of transform blocks; re-export the model")
    for block in blocks:
        if not isinstance(block, dict) or not isinstance(block.get("name"), str):
            raise UserError(f"{where}: {block!r} is not a block with a name; re-export the "
                            f"model")
        for key, value in block.items():
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, (int, float)) and not abs(item) <= MAX_SIDE:
                    raise UserError(f"{where}: {block['name']}.{key} {value!r} is out of "
                                    f"bounds (at most {MAX_SIDE}); re-export the model")
                if not (item is None or isinstance(item, (int, float, str))):
                    raise UserError(f"{where}: {block['name']}.{key} {value!r} is not a "
                                    f"number, string or list of them; re-export the model")
