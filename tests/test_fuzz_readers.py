"""Fuzzing the file readers with mutations of real files.

Seeds are files the toolkit really reads: a checkpoint of a toy training run, weights files
(float32; float16 and bfloat16; pickle protocol 2), and the PyTorch fixtures in both formats.
Hypothesis draws the mutations (seeded, so a run is reproducible): byte flips, truncations,
pickle opcodes inserted or replaced at opcode boundaries, integer and length operands set
to boundary values, spliced opcode runs, and edited zip header fields; pickle-level
mutations of a zip file change its ``data.pkl`` and re-zip it, so they reach the reader
behind the zip layer.

Every case must load (a mutation of tensor bytes or names still makes a valid file) or end
in one UserError line. Cases run in forked workers with a bounded address space
(tests/isolated.py), many per worker; a crash, a hang, a MemoryError or any other exception
fails the test and names the seed and mutation (reapply it with :func:`mutate`).

Another file kind joins by adding a seed to :func:`seed_files` and its reader to ``READERS``.
"""
import io
import os
import pickle
import pickletools
import struct
import zipfile

import numpy as np
import paddle
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from isolated import in_child, needs_linux, outcome
from passl.config import load_config
from passl.engine.trainer import Trainer
from passl.io import checkpoint
from passl.io.torch_file import read_torch_file
from passl.io.weights import read_weights
from passl.models.torch_weights import map_torch_state, read_torch_states
from toy_training import toy_config, write_config

pytestmark = needs_linux
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TORCH_SEEDS = ("tensor_kinds_legacy.pth", "tensor_kinds_zip.pth", "linear_tiny_legacy.pth",
               "swav_tiny_legacy.pth", "swav_tiny_zip.pth")
#: file kind -> the call that reads it as the toolkit does.
READERS = {
    "weights": lambda path: len(read_weights(path)),
    "checkpoint": lambda path: len(checkpoint.load_checkpoint(path)),
    "torch": lambda path: len(read_torch_file(path)),
    "torch state dict": lambda path: len(map_torch_state(read_torch_states([path]), "swav")[0]),
}
OPCODES = sorted({op.code.encode("latin1") for op in pickletools.opcodes})
#: Operand values that probe sizes, signs and offsets.
INTERESTING = (0, 1, 2, 7, 8, 255, 256, 2 ** 15, 2 ** 16 - 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1,
               2 ** 62, 2 ** 63 - 1, -1, -2 ** 31)
#: Zip header fields: (signature, offset, struct format) of local and central records.
ZIP_FIELDS = [(signature, offset, fmt) for signature, fields in (
    (b"PK\x03\x04", ((6, "<H"), (8, "<H"), (14, "<I"), (18, "<I"), (22, "<I"), (26, "<H"),
                     (28, "<H"))),  # local header: flags, method, crc, sizes, name/extra length
    (b"PK\x01\x02", ((8, "<H"), (10, "<H"), (16, "<I"), (20, "<I"), (24, "<I"), (28, "<H"),
                     (30, "<H"), (42, "<I"))),  # central record: the same and the local offset
    (b"PK\x05\x06", ((10, "<H"), (12, "<I"), (16, "<I"))),  # end: entries, directory size/offset
) for offset, fmt in fields]
DEFAULT_CASES, SLOW_CASES = int(os.environ.get("PASSL_FUZZ_CASES", 2000)), 20000
CASES_PER_WORKER = 500
SCRATCH = "/dev/shm"  # the cases' files: a memory file system where there is one


# ---------------------------------------------------------------- seeds and their structure

def seed_files(directory):
    """``{name: (kind, bytes)}`` of the real files the fuzzer mutates."""
    seeds = {}
    run = toy_config(directory / "run", epochs=1, size=16)
    Trainer(load_config(write_config(run, directory / "toy.yaml"))).train()
    with open(directory / "run" / "checkpoints" / "epoch_1.pd", "rb") as f:
        seeds["toy checkpoint"] = ("checkpoint", f.read())
    paddle.seed(0)
    layer = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4),
                                 paddle.nn.Linear(4, 3))
    state = layer.state_dict()
    half = {"half": paddle.to_tensor(np.linspace(-2, 2, 12, dtype="float32")).astype("float16"),
            "bf16": paddle.to_tensor(np.linspace(-2, 2, 12, dtype="float32")).astype("bfloat16")}
    for name, obj, protocol in (("weights", state, 4), ("weights protocol 2", state, 2),
                                ("float16 and bfloat16 weights", half, 4)):
        stream = io.BytesIO()
        paddle.save(obj, stream, protocol=protocol)
        seeds[name] = ("weights", stream.getvalue())
    for name in TORCH_SEEDS:  # the SwAV files as tools/convert_weights.py reads them
        with open(os.path.join(FIXTURES, name), "rb") as f:
            seeds[name] = ("torch state dict" if "swav" in name else "torch", f.read())
    return seeds


def pickle_spans(data):
    """``[(start, end)]`` of the pickles at the start of ``data`` (a legacy PyTorch stream
    holds five)."""
    spans, stream = [], io.BytesIO(data)
    while stream.tell() < len(data) and data[stream.tell():stream.tell() + 1] == b"\x80" \
            and len(spans) < 5:
        start = stream.tell()
        for _ in pickletools.genops(stream):
            pass
        spans.append((start, stream.tell()))
    return spans


def opcode_sites(data, start=0):
    """``[(position, opcode name, operand length)]`` of every opcode in the pickle at ``start``."""
    sites, ops = [], list(pickletools.genops(io.BytesIO(data[start:])))
    for (op, _, pos), following in zip(ops, ops[1:] + [(None, None, None)]):
        end = following[2] if following[2] is not None else pos + 1
        sites.append((start + pos, op.name, end - pos - 1))
    return sites


class Seed:
    """A seed file with its opcode sites (in ``data.pkl`` for a zip)."""

    def __init__(self, name, kind, data):
        self.name, self.kind, self.data = name, kind, data
        self.zipped = data[:4] == b"PK\x03\x04"
        self.pickle = _data_pkl(data)[1] if self.zipped else data
        self.sites = [site for start, _ in pickle_spans(self.pickle)
                      for site in opcode_sites(self.pickle, start)]


def _data_pkl(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        return name, archive.read(name)


def _rezip(data, new_pickle):
    """The zip ``data`` with its data.pkl replaced (entries, order and methods kept)."""
    source, stream = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(stream, "w") as archive:
        for info in source.infolist():
            content = new_pickle if info.filename.endswith("data.pkl") else source.read(info)
            archive.writestr(info, content)
    return stream.getvalue()


# ---------------------------------------------------------------- mutations

def mutate(seed_file, mutation):
    """The bytes of ``seed_file`` after ``mutation`` (a tuple a strategy below draws)."""
    kind, *args = mutation
    if kind == "zip field":
        return _edit_zip_field(seed_file.data, *args)
    if kind in ("flip", "truncate"):
        data = bytearray(seed_file.data)
        if kind == "truncate":
            return bytes(data[:args[0] % (len(data) + 1)])
        for position, value in args[0]:
            data[position % len(data)] = value
        return bytes(data)
    data = bytearray(seed_file.pickle)
    sites = seed_file.sites
    position, name, operand = sites[args[0] % len(sites)]
    if kind == "insert opcode":
        data[position:position] = args[1] + args[2]
    elif kind == "replace opcode":
        data[position:position + 1] = args[1]
    elif kind == "operand":
        width = min(operand, 8)
        value = args[1] % (1 << (8 * width)) if width else 0
        data[position + 1:position + 1 + width] = value.to_bytes(width, "little") if width \
            else b""
    elif kind == "splice":
        start = sites[args[1] % len(sites)][0]
        end = sites[min(len(sites) - 1, args[1] % len(sites) + args[2])][0]
        data[position:position] = seed_file.pickle[start:end]
    return _rezip(seed_file.data, bytes(data)) if seed_file.zipped else bytes(data)


def _edit_zip_field(data, record, occurrence, value):
    data = bytearray(data)
    signature, offset, fmt = ZIP_FIELDS[record % len(ZIP_FIELDS)]
    found, at = [], data.find(signature)
    while at != -1:
        found.append(at)
        at = data.find(signature, at + 1)
    if not found:
        return bytes(data)
    at = found[occurrence % len(found)] + offset
    size = struct.calcsize(fmt)
    data[at:at + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    return bytes(data)


def mutations(seeds):
    names = sorted(seeds)
    positions = st.integers(0, 1 << 30)
    values = st.one_of(st.sampled_from(INTERESTING), st.integers(-2 ** 64, 2 ** 64))
    common = [
        st.tuples(st.just("flip"), st.lists(st.tuples(positions, st.integers(0, 255)),
                                            min_size=1, max_size=8)),
        st.tuples(st.just("truncate"), positions),
        st.tuples(st.just("insert opcode"), positions, st.sampled_from(OPCODES),
                  st.binary(max_size=9)),
        st.tuples(st.just("replace opcode"), positions, st.sampled_from(OPCODES)),
        st.tuples(st.just("operand"), positions, values),
        st.tuples(st.just("splice"), positions, positions, st.integers(1, 40)),
    ]
    zip_edit = st.tuples(st.just("zip field"), st.integers(0, len(ZIP_FIELDS) - 1),
                         st.integers(0, 1000), values)

    @st.composite
    def case(draw):
        name = draw(st.sampled_from(names))
        options = common + ([zip_edit] if seeds[name].zipped else [])
        return name, draw(st.one_of(options))

    return case()


# ---------------------------------------------------------------- running

def fuzz_in_worker(seeds, examples, worker_seed, directory, send):
    """Run ``examples`` hypothesis cases; ``send`` each case before reading it and every
    failure (anything but a load or one UserError line) after."""
    path = os.path.join(SCRATCH if os.path.isdir(SCRATCH) else directory,
                        f"passl_fuzz_{os.getpid()}")

    @seed(worker_seed)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(mutations(seeds))
    def case(drawn):
        name, mutation = drawn
        send(("case", name, mutation))
        with open(path, "wb") as f:
            f.write(mutate(seeds[name], mutation))
        kind, value = outcome(lambda: READERS[seeds[name].kind](path))
        if kind == "exception" or (kind == "user_error" and ("\n" in value or not value)):
            send(("failure", name, mutation, kind, value))
        send(("ran", kind))

    try:
        case()
    finally:
        if os.path.exists(path):
            os.remove(path)


def fuzz(tmp_path, cases, first_seed):
    seeds = {name: Seed(name, kind, data) for name, (kind, data) in seed_files(tmp_path).items()}
    failures, outcomes = [], {"ok": 0, "user_error": 0, "exception": 0}
    for worker in range(-(-cases // CASES_PER_WORKER)):
        examples = min(CASES_PER_WORKER, cases - worker * CASES_PER_WORKER)
        messages, end = in_child(
            lambda send: fuzz_in_worker(seeds, examples, first_seed + worker, str(tmp_path),
                                        send),
            timeout=60 + examples)
        for message in messages:
            if message[0] == "failure":
                failures.append(message[1:])
            elif message[0] == "ran":
                outcomes[message[1]] += 1
        if end is not None:
            last = [m for m in messages if m[0] == "case"][-1:]
            failures.append((*(last[0][1:] if last else ("?", "?")), "crash", end))
    return failures, outcomes


def check_fuzz(tmp_path, cases, first_seed):
    failures, outcomes = fuzz(tmp_path, cases, first_seed)
    assert not failures, "\n".join(repr(f)[:400] for f in failures[:10])
    ran = sum(outcomes.values())
    assert ran >= cases * 0.95, outcomes  # the workers ran (nearly) every case
    assert outcomes["ok"] and outcomes["user_error"], outcomes  # both ends were reached


def test_mutated_files_load_or_are_one_line(tmp_path):
    check_fuzz(tmp_path, DEFAULT_CASES, first_seed=0)


@pytest.mark.slow
def test_many_mutated_files_load_or_are_one_line(tmp_path):
    check_fuzz(tmp_path, SLOW_CASES, first_seed=1000)  # other cases than the default run


def test_mutations_are_reproducible_and_reach_the_pickle(tmp_path):
    """The same mutation gives the same bytes; a pickle-level one changes a zip's data.pkl."""
    data = open(os.path.join(FIXTURES, "tensor_kinds_zip.pth"), "rb").read()
    seed_file = Seed("zip", "torch", data)
    mutation = ("replace opcode", 5, b"N")
    once, twice = mutate(seed_file, mutation), mutate(seed_file, mutation)
    assert once == twice and once != data
    assert _data_pkl(once)[1] != seed_file.pickle and len(_data_pkl(once)[1]) == \
        len(seed_file.pickle)
    assert pickle.loads(pickle.dumps(mutation)) == mutation  # crosses the worker's pipe
