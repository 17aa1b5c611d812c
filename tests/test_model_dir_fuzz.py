"""Fuzzing exported model directories: seeded mutations of a real export (its graph, weights
and inference.yml), each run by tools/predict.py's Predictor in a worker process
(tests/model_dir_fuzz_worker.py) with a capped address space.

What each case must end in:
- a changed graph or weights file with the export's sha256 left as it was (a damaged copy):
  the original predictions or one error line;
- a changed graph or weights file with matching sha256 (a crafted directory), or a changed
  inference.yml: predictions (equal or not: a crafted model may compute something else) or
  one error line, and always an error line when the graph gained an operator that touches
  files.
Never a Python traceback, a crash of the worker, or more than the memory bound.
The mutations are plain seeded ``random`` edits (byte flips, truncations, operator renames,
deletions and duplications, attribute and YAML value replacements); 40 run by default,
``-m slow`` runs 4000. ``PASSL_FUZZ_KEEP=DIR`` keeps a copy of each failing
case there.
"""
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from passl.deploy.predict import Predictor
from passl.io.inference_model import IO_OPS, META_FILE
from test_model_dir_safety import export_dir, restamp

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "model_dir_fuzz_worker.py")
MAX_RSS_MB = 3000

OP_NAMES = ["1.conv2d", "1.relu", "1.add", "1.matmul", "1.pool2d", "1.flatten", "1.data",
            "1.fetch", "p", "1.exp", "1.save", "1.save_combine", "1.load_combine", "1.print",
            "1.py_func", "2.yield", "3.my_op", "9.unknown", "", "1.", "."]
VALUES = [-1, 0, 1, 2, 3, 7, 255, 4096, 4097, 2 ** 31, -2 ** 31, 10 ** 12, 1e-30, 1e308,
          float("nan"), "", "x", "NCHW", None, True, [], {}, [0], [-1, 3, 32, 32],
          [1] * 9, [[1]], {"name": "Resize"}]


def flip_bytes(data, rng):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def truncate(data, rng):
    return data[:rng.randrange(len(data))]


def byte_edit(data, rng):
    return flip_bytes(data, rng) if rng.random() < 0.6 else truncate(data, rng)


def ops_lists(program):
    found, pending = [], [program]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if isinstance(node.get("ops"), list) and node["ops"]:
                found.append(node["ops"])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return found


def numbers_in(node, path=()):
    """Paths to every number in a JSON tree."""
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in numbers_in(value, path + (key,))]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in numbers_in(value, path + (i,))]
    return [path] if isinstance(node, (int, float)) and not isinstance(node, bool) else []


def set_at(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def edit_pir_graph(text, rng):
    """One structural edit of a PIR program; returns (new text, operator it added or None)."""
    program = json.loads(text)
    ops = rng.choice(ops_lists(program))
    what, added = rng.choice(["rename", "delete", "duplicate", "number"]), None
    if what == "rename":
        added = rng.choice(OP_NAMES)
        rng.choice(ops)["#"] = added
    elif what == "delete":
        ops.pop(rng.randrange(len(ops)))
    elif what == "duplicate":
        ops.insert(rng.randrange(len(ops)), json.loads(json.dumps(rng.choice(ops))))
    else:
        set_at(program, rng.choice(numbers_in(program)), rng.choice(VALUES))
    return json.dumps(program), added


def edit_legacy_graph(data, rng):
    from paddle.base.proto import framework_pb2
    program = framework_pb2.ProgramDesc.FromString(data)
    op = rng.choice(program.blocks[0].ops)
    op.type = rng.choice(["conv2d", "relu", "feed", "exp", "save", "load_combine", "print"])
    return program.SerializeToString(), op.type


def edit_meta(text, rng):
    """A YAML value replaced, a key deleted or added, or the text's bytes edited."""
    if rng.random() < 0.25:
        return byte_edit(text.encode(), rng).decode("utf-8", "replace")
    meta = yaml.safe_load(text)
    paths = []
    pending = [((), meta)]
    while pending:
        path, node = pending.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        for key, value in items:
            paths.append(path + (key,))
            pending.append((path + (key,), value))
    path = rng.choice(paths)
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[path[-1]]
    elif isinstance(parent, dict) and rng.random() < 0.1:
        parent["extra"] = rng.choice(VALUES)
    else:
        parent[path[-1]] = rng.choice(VALUES)
    return yaml.safe_dump(meta)


def make_case(rng, bases, directory):
    """Write one mutated model directory; returns (description, allowed results)."""
    kind = rng.choice(["pir", "pir", "legacy"])
    shutil.copytree(bases[kind], directory)
    graph = os.path.join(directory, "model.json" if kind == "pir" else "model.pdmodel")
    params = os.path.join(directory, "model.pdiparams")
    meta = os.path.join(directory, META_FILE)
    crafted = {"equal", "different", "error"}
    target = rng.choice(["graph", "graph", "params", "meta", "meta"])
    if target == "meta":
        with open(meta) as f:
            text = f.read()
        with open(meta, "w") as f:
            f.write(edit_meta(text, rng))
        return f"{kind} inference.yml edited", crafted
    path = graph if target == "graph" else params
    with open(path, "rb") as f:
        data = f.read()
    added = None
    if target == "graph" and rng.random() < 0.6:
        if kind == "pir":
            text, added = edit_pir_graph(data.decode(), rng)
            data = text.encode()
        else:
            data, added = edit_legacy_graph(data, rng)
    else:
        data = byte_edit(data, rng)
    with open(path, "wb") as f:
        f.write(data)
    if rng.random() < 0.3:
        return f"{kind} {target} damaged (sha256 kept)", {"equal", "error"}
    restamp(directory)
    if added is not None and added.rpartition(".")[2] in IO_OPS:
        return f"{kind} graph crafted with operator {added!r}", {"error"}
    return f"{kind} {target} crafted (sha256 matching)", crafted


class Worker:
    """tests/model_dir_fuzz_worker.py, restarted after a crash."""

    def __init__(self, images, reference):
        self.argv = [sys.executable, WORKER, images, reference]
        self.process = None

    def ask(self, directory):
        if self.process is None:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            text=True)
        self.process.stdin.write(directory + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith("fuzz-answer: "):
                return json.loads(line[len("fuzz-answer: "):])
        code = self.process.wait()
        self.process = None
        return {"result": "crash", "detail": f"worker exit status {code}"}

    def close(self):
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
            self.process.stdout.close()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz_bases")
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    import cv2
    for i in range(5):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), np.uint8))
    dirs = {"pir": export_dir(base / "pir"), "legacy": export_dir(base / "legacy", legacy=True)}
    files = sorted(str(p) for p in images.iterdir())
    _, reference = Predictor(dirs["pir"], device="cpu", batch_size=4).predict_files(files)
    _, legacy = Predictor(dirs["legacy"], device="cpu", batch_size=4).predict_files(files)
    np.testing.assert_array_equal(legacy, reference)  # one reference for both formats
    np.save(base / "reference.npy", reference)
    return {**dirs, "images": str(images), "reference": str(base / "reference.npy")}


def fuzz(bases, tmp_path, seed, cases):
    rng = random.Random(seed)
    worker, failures, counts = Worker(bases["images"], bases["reference"]), [], {}
    try:
        for case in range(cases):
            directory = str(tmp_path / f"case{case}")
            description, allowed = make_case(rng, bases, directory)
            answer = worker.ask(directory)
            counts[answer["result"]] = counts.get(answer["result"], 0) + 1
            if answer["result"] not in allowed or answer.get("peak_rss_mb", 0) > MAX_RSS_MB:
                failures.append((seed, case, description, answer))
                if os.environ.get("PASSL_FUZZ_KEEP"):  # a folder to keep failing cases in
                    shutil.copytree(directory, os.path.join(os.environ["PASSL_FUZZ_KEEP"],
                                                            f"seed{seed}-case{case}"))
            shutil.rmtree(directory)
    finally:
        worker.close()
    print(f"seed {seed}: {cases} cases, results {counts}")
    assert failures == [], "\n".join(map(str, failures))
    assert counts.get("error", 0) and counts.get("equal", 0)  # both sides were reached


def test_fuzzed_model_dirs_predict_or_end_in_one_line(bases, tmp_path):
    fuzz(bases, tmp_path, seed=0, cases=40)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fuzzed_model_dirs_many(bases, tmp_path, seed):
    fuzz(bases, tmp_path, seed=seed, cases=1000)
