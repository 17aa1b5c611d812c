"""Files built to attack the readers end in one UserError line, before anything large is
allocated or any native code gets values the file chose.

Every file is spelled out opcode by opcode (tests/hostile_pickles.py). Each read runs in a
forked child with a bounded address space (tests/isolated.py), so a crash or a runaway
allocation fails the test instead of the run. Only names that existed before these checks
are imported, so the same tests show what the earlier readers did with these files.
"""
import os
import pickle as P
import zipfile
import zlib

import numpy as np
import paddle
import pytest

from hostile_pickles import (array, dct, dtype, edit_zip_entry, generator_state, glob,
                             legacy_file, nested_lists, num, program, raw, storage, tensor, text,
                             tup, zip_file)
from isolated import needs_linux, run_call
from passl.io import checkpoint
from passl.io.paddle_file import load_paddle_file
from passl.io.torch_file import read_torch_file, torch_state_dict
from passl.io.weights import read_weights

pytestmark = needs_linux
FLOATS = dtype("f4")


def write(tmp_path, name, data):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def assert_refused(result, *fragments):
    """One UserError line containing every fragment."""
    kind, message = result
    assert kind == "user_error", result
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def paddle_result(path):
    """What load_paddle_file gives, reduced to something that crosses the fork's pipe."""
    def call():
        loaded = load_paddle_file(path, "--pretrained")
        return repr(type(loaded))
    return run_call(call)


def torch_result(path, timeout=120):
    return run_call(lambda: sorted(read_torch_file(path)), timeout=timeout)


# ---------------------------------------------------------------- native code steered by a file

def test_a_dtype_with_a_field_far_outside_its_item_is_refused(tmp_path):
    """The V8 dtype whose one field lies 2 GiB past the item, then SETITEM on an array of it:
    a write of the file's 8 bytes at that offset (a crash, or memory corruption)."""
    field = P.EMPTY_DICT + text("f0") + dtype("u8") + num(2 ** 31) + P.TUPLE2 + P.SETITEM
    v8 = dtype("V8", "|", text("f0") + P.TUPLE1, field, 8, 1, 16)
    path = write(tmp_path, "evil.pdparams", program(
        P.EMPTY_DICT, text("w"), array((1,), v8, b"\0" * 8),
        num(0), tup(num(0x4141414141414141)), P.SETITEM, P.SETITEM))
    assert os.path.getsize(path) < 300
    assert_refused(paddle_result(path), "array of non-numbers (dtype 'V8')")


def test_a_numeric_dtype_cannot_take_fields_from_build(tmp_path):
    fields = P.EMPTY_DICT + text("f0") + dtype("u8") + num(8) + P.TUPLE2 + P.SETITEM
    u8 = dtype("u8", "<", text("f0") + P.TUPLE1, fields, 16, 1, 16)
    path = write(tmp_path, "fields.pdparams", program(dct(w=array((1,), u8, b"\0" * 16))))
    assert_refused(paddle_result(path), "a dtype u8 with fields, sub-arrays or flags")


def test_a_scalar_of_a_structured_dtype_is_refused(tmp_path):
    """As a checkpoint's epoch: later code reading it crashed."""
    v8 = dtype("V8", "|", elsize=8, align=1)
    scalar = glob("numpy.core.multiarray", "scalar") + tup(v8, raw(b"\0" * 8)) + P.REDUCE
    path = write(tmp_path, "epoch.pd", program(dct(kind=text(checkpoint.KIND), epoch=scalar)))
    assert_refused(paddle_result(path), "dtype 'V8'")


TOO_MANY = [ord(c) for c in " ".join(["1"] * 400)]


@pytest.mark.parametrize("state, message", [
    (None, "a random generator state without its numbers (no BUILD)"),
    (tup(num(-1), num(5), num(0), P.EMPTY_LIST), "a random generator state with 1 numbers"),
    (tup(num(-1), num(5), num(0), P.EMPTY_LIST + P.MARK + b"".join(map(num, TOO_MANY))
         + P.APPENDS), "a random generator state with 400 numbers"),
    (tup(num(-1), num(-5), num(0), P.EMPTY_LIST), "a random generator state of the wrong form"),
])
def test_generator_states_come_only_from_checked_numbers(tmp_path, state, message):
    path = write(tmp_path, "rng.pd", program(dct(rng=P.EMPTY_LIST + generator_state(state)
                                                 + P.APPEND)))
    assert_refused(paddle_result(path), message)


def test_a_valid_generator_state_reads_as_paddle_load_reads_it(tmp_path):
    path = str(tmp_path / "rng.pd")
    paddle.save({"rng": paddle.get_rng_state("cpu")}, path)
    ours, theirs = load_paddle_file(path, "--resume"), paddle.load(path)
    assert ours["rng"][0].__getstate__() == theirs["rng"][0].__getstate__()


LOOSE_ENDS = [
    ("_reconstruct of an object array, SETITEM of data",
     glob("numpy.core.multiarray", "_reconstruct")
     + tup(glob("numpy", "ndarray"), tup(num(3)), text("O")) + P.REDUCE
     + num(0) + num(7) + P.SETITEM,
     "_reconstruct of something other than an empty ndarray"),
    ("ndarray((2,), 'O')",
     glob("numpy", "ndarray") + tup(tup(num(2)), text("O")) + P.REDUCE + num(0) + num(7)
     + P.SETITEM,
     "REDUCE calls the global numpy.ndarray, which the file may not call"),
    ("BUILD on an OrderedDict",
     glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE
     + dct(get=num(1), keys=num(2)) + P.BUILD,
     "BUILD on a OrderedDict, which takes no state from a file"),
    ("SETITEM on an array",
     array((2,), FLOATS, b"\0" * 8) + num(0) + num(1) + P.SETITEM,
     "SETITEM on a _Array, which the reader did not make as a container"),
    ("APPEND on a tuple",
     tup(num(1)) + num(2) + P.APPEND,
     "APPEND on a tuple, which the reader did not make as a container"),
    ("BUILD on a dtype after use",
     dtype("f4") + P.DUP + tup(num(3), text("<"), P.NONE, P.NONE, P.NONE, num(-1), num(-1),
                               num(0)) + P.BUILD,
     "not a file written by paddle.save"),
]


@pytest.mark.parametrize("name, ops, message", LOOSE_ENDS, ids=[case[0] for case in LOOSE_ENDS])
def test_only_containers_the_reader_made_take_items_or_state(tmp_path, name, ops, message):
    path = write(tmp_path, "loose.pdparams", program(P.EMPTY_DICT, text("w"), ops, P.SETITEM))
    assert_refused(paddle_result(path), message)


def test_a_torch_state_dict_keeps_its_metadata_build_but_no_other(tmp_path):
    """``model.state_dict()`` pickles its ``_metadata`` attribute with BUILD: accepted and
    dropped; any other attribute would hide the dict's methods."""
    def state_dict(attributes):
        return (glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE
                + P.MARK + text("w") + tensor(storage("FloatStorage", "0", 2), 0, (2,), (1,))
                + P.SETITEMS + attributes + P.BUILD)
    floats = [("0", 2, np.array([1.5, -2], np.float32).tobytes())]
    good = write(tmp_path, "metadata.pth", legacy_file(program(state_dict(
        dct(_metadata=dct(**{"": dct(version=num(1))})))), floats))
    assert read_torch_file(good)["w"].tolist() == [1.5, -2]
    bad = write(tmp_path, "keys.pth", legacy_file(program(state_dict(dct(keys=num(1)))), floats))
    assert_refused(torch_result(bad), "BUILD on an OrderedDict with attributes other than "
                                      "_metadata")


def test_build_on_a_torch_storage_type_is_refused(tmp_path):
    """BUILD on the storage type shared by every tensor of that type changed their dtype."""
    obj = (glob("torch", "FloatStorage") + dct(dtype=text("V8")) + P.BUILD + P.POP
           + dct(w=tensor(storage("FloatStorage", "0", 2), 0, (2,), (1,))))
    path = write(tmp_path, "storage_type.pth", legacy_file(program(obj), [("0", 2, b"\0" * 8)]))
    assert_refused(torch_result(path), "BUILD on the global torch.FloatStorage")


# ---------------------------------------------------------------- memory from tiny files

def test_a_tiny_pdparams_cannot_declare_a_huge_array(tmp_path):
    made = write(tmp_path, "huge.pdparams", program(dct(
        w=glob("numpy", "ndarray") + tup(tup(num(10 ** 9)), text("f4")) + P.REDUCE)))
    assert os.path.getsize(made) < 100
    assert_refused(paddle_result(made), "REDUCE calls the global numpy.ndarray")
    built = write(tmp_path, "short.pdparams", program(dct(w=array((10 ** 9,), FLOATS, b"\0" * 4))))
    assert_refused(paddle_result(built), "an array of shape [1000000000] and dtype float32 needs "
                                         "4,000,000,000 bytes, the file gives 4")


def test_a_stride_0_tensor_cannot_expand_one_number(tmp_path):
    obj = dct(w=tensor(storage("FloatStorage", "0", 1), 0, (30000, 30000), (0, 0)))
    path = write(tmp_path, "expand.pth", legacy_file(program(obj), [("0", 1, b"\0" * 4)]))
    assert os.path.getsize(path) < 400
    assert_refused(torch_result(path), "describes 3,600,000,000 bytes of data, more than the")


def test_many_views_of_one_storage_cannot_multiply_it(tmp_path):
    numel = 1 << 16  # 256 KiB of float32, viewed 4000 times: 1 GiB
    views = b"".join(text(f"v{i}") + tensor(storage("FloatStorage", "0", numel), 0, (numel,),
                                             (1,)) for i in range(4000))
    obj = P.EMPTY_DICT + P.MARK + views + P.SETITEMS
    path = write(tmp_path, "views.pth",
                 legacy_file(program(obj), [("0", numel, b"\0" * 4 * numel)]))
    assert_refused(torch_result(path), "bytes of data, more than the")


def test_a_zip_entry_cannot_inflate_beyond_its_storage(tmp_path):
    obj = program(dct(w=tensor(storage("FloatStorage", "0", 4), 0, (4,), (1,))))
    bomb = zip_file(obj, {"0": b"\0" * (64 << 20)}, zipfile.ZIP_DEFLATED)
    path = write(tmp_path, "bomb.pth", bomb)
    assert os.path.getsize(path) < 1 << 20
    assert_refused(torch_result(path), "the zip entry archive/data/0 holds 67,108,864 bytes, "
                                       "more than the 16 it may")


def test_storages_beyond_the_file_size_are_refused_before_reading(tmp_path):
    obj = program(dct(w=tensor(storage("FloatStorage", "0", 10 ** 9), 0, (4,), (1,))))
    path = write(tmp_path, "declared.pth", zip_file(obj, {"0": b"\0" * 16}))
    assert_refused(torch_result(path), "storages of 4,000,000,000 bytes in a file of")


# ---------------------------------------------------------------- one line, not a traceback

def valid_zip_pth():
    obj = program(dct(w=tensor(storage("FloatStorage", "0", 4), 0, (4,), (1,))))
    return zip_file(obj, {"0": np.arange(4, dtype=np.float32).tobytes()})


def test_the_hand_made_zip_reads(tmp_path):
    path = write(tmp_path, "ok.pth", valid_zip_pth())
    assert read_torch_file(path)["w"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("edit, message", [
    (dict(flag_bits=0x1), "the zip entry archive/data.pkl is encrypted, which PyTorch never "
                          "writes; decrypt the archive first"),
    (dict(method=99), "the zip entry archive/data.pkl uses compression method 99, which "
                      "PyTorch never writes"),
])
def test_zip_features_pytorch_never_uses_are_named(tmp_path, edit, message):
    path = write(tmp_path, "edited.pth", edit_zip_entry(valid_zip_pth(), "archive/data.pkl",
                                                        **edit))
    assert_refused(torch_result(path), message)


def test_a_global_whose_name_holds_a_newline_is_named_on_one_line(tmp_path):
    """Found by the fuzzer: STACK_GLOBAL takes its names from strings, which may hold anything."""
    ops = text("numpy.core.multiarray") + text("_recon\nstruct") + P.STACK_GLOBAL
    path = write(tmp_path, "newline.pdparams", program(dct(w=ops)))
    assert_refused(paddle_result(path), "the global numpy.core.multiarray._recon\\nstruct")


def test_a_negative_tensor_size_is_one_line(tmp_path):
    obj = program(dct(w=tensor(storage("FloatStorage", "0", 4), 0, (-1,), (1,))))
    path = write(tmp_path, "negative.pth", zip_file(obj, {"0": b"\0" * 16}))
    assert_refused(torch_result(path), "a tensor with offset 0, size (-1,)")


@pytest.mark.parametrize("reader", ["paddle", "torch"])
def test_deep_nesting_is_one_line(tmp_path, reader):
    nested = program(dct(w=nested_lists(200000)))
    if reader == "paddle":
        result = paddle_result(write(tmp_path, "deep.pdparams", nested))
    else:
        result = torch_result(write(tmp_path, "deep.pth", legacy_file(nested, [])))
    assert_refused(result, "containers nested deeper than 100")


def test_a_huge_legacy_element_count_is_one_line(tmp_path):
    obj = dct(w=tensor(storage("FloatStorage", "0", 4), 0, (4,), (1,)))
    path = write(tmp_path, "count.pth", legacy_file(program(obj), [("0", 2 ** 62, b"\0" * 16)]))
    assert_refused(torch_result(path), "storage 0 holds 4611686018427387904 elements, the "
                                       "object says 4")


def test_a_torch_state_dict_with_a_number_for_a_name_is_one_line(tmp_path):
    obj = program(P.EMPTY_DICT + num(0) + tensor(storage("FloatStorage", "0", 4), 0, (4,), (1,))
                  + P.SETITEM)
    path = write(tmp_path, "int_key.pth", zip_file(obj, {"0": b"\0" * 16}))
    assert_refused(run_call(lambda: sorted(torch_state_dict(read_torch_file(path), path))),
                   "the state dict holds non-tensor entries (0)")


def test_a_structured_array_as_pretrained_weights_is_one_line(tmp_path):
    path = str(tmp_path / "structured.pdparams")
    with open(path, "wb") as f:
        P.dump({"w": np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])}, f, protocol=4)
    assert_refused(run_call(lambda: sorted(read_weights(path))), "array of non-numbers")


def test_a_weights_file_of_non_tensors_is_one_line(tmp_path):
    path = str(tmp_path / "numbers.pdparams")
    paddle.save({"conv.weight": 3, "conv.bias": paddle.zeros([2])}, path)
    assert_refused(run_call(lambda: sorted(read_weights(path))),
                   "these entries are not: conv.weight (int)")


def resumable(**changes):
    state = {"kind": checkpoint.KIND, "version": checkpoint.VERSION, "epoch": 1, "iter": 4,
             "model": {"w": paddle.ones([2])}, "optimizer": {}, "lr_scheduler": {},
             "world_size": 1, "per_rank": [{"hooks": {}, "rng": checkpoint.rng_state()}]}
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


@pytest.mark.parametrize("changes, message", [
    (dict(optimizer=None), "the checkpoint has no 'optimizer'"),
    (dict(epoch="1"), "the checkpoint's 'epoch' is a str, expected a count"),
    (dict(per_rank=[{"hooks": {}, "rng": {**checkpoint.rng_state(), "numpy": ("MT19937",)}}]),
     "process 0: the numpy random state is malformed (IndexError)"),
    (dict(per_rank=[{"hooks": {}, "rng": {**checkpoint.rng_state(), "python": (3, (1,), None)}}]),
     "process 0: the python random state is malformed (ValueError)"),
    (dict(model={"w": 1, "v": paddle.ones([2])}),
     "'model': a state dict holds tensors by name; these entries are not: w (int)"),
])
def test_a_damaged_checkpoint_is_one_line_on_resume(tmp_path, changes, message):
    path = str(tmp_path / "damaged.pd")
    paddle.save(resumable(**changes), path)
    assert_refused(run_call(lambda: sorted(checkpoint.load_checkpoint(path))),
                   f"--resume {path}: {message}")


def test_the_undamaged_checkpoint_loads(tmp_path):
    path = str(tmp_path / "ok.pd")
    paddle.save(resumable(), path)
    assert sorted(checkpoint.load_checkpoint(path))[:3] == ["epoch", "iter", "kind"]


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_directory_or_fifo_is_named(tmp_path, kind):
    path = str(tmp_path / "thing")
    os.mkdir(path) if kind == "directory" else os.mkfifo(path)
    named = {"directory": "is a directory", "fifo": "is a named pipe (FIFO), not a file"}[kind]
    assert_refused(paddle_result(path), f"--pretrained {path}: {named}")
    assert_refused(torch_result(path, timeout=20), f"{path}: {named}")


def test_a_corrupt_deflate_stream_is_one_line(tmp_path):
    obj = program(dct(w=tensor(storage("FloatStorage", "0", 4), 0, (4,), (1,))))
    data = bytearray(zip_file(obj, {"0": zlib.compress(b"x") * 4}, zipfile.ZIP_DEFLATED))
    start = data.find(b"archive/data.pkl") + len("archive/data.pkl")
    data[start + 2:start + 12] = b"\xff" * 10  # inside the compressed pickle
    assert_refused(torch_result(write(tmp_path, "corrupt.pth", bytes(data))),
                   "truncated or not a PyTorch checkpoint")
