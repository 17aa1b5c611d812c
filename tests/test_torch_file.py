"""passl.io.torch_file: PyTorch checkpoints read without torch, and refused when unsafe or broken.

The .pth fixtures were written by torch 2.13 (tests/fixtures/make_torch_fixtures.py) in both
of torch.save's formats; torch_outputs.npz holds the values torch itself had.
"""
import io
import os
import pickle
import pickletools
import zipfile

import numpy as np
import pytest

from passl.errors import UserError
from passl.io.safe_pickle import UnsafeFileError
from passl.io.torch_file import LEGACY_MAGIC, read_torch_file, torch_state_dict

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FORMATS = ["legacy", "zip"]
MARKER = "/tmp/passl_torch_file_test_ran_code"


def fixture(name):
    return os.path.join(FIXTURES, name)


@pytest.fixture(scope="module")
def expected():
    return np.load(fixture("torch_outputs.npz"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_storage_kind_and_view_reads_exactly(fmt, expected):
    kinds = read_torch_file(fixture(f"tensor_kinds_{fmt}.pth"))
    assert sorted(kinds) == sorted(k[len("kind_"):] for k in expected if k.startswith("kind_"))
    for name, array in kinds.items():
        want = expected[f"kind_{name}"]
        assert array.dtype == want.dtype and array.shape == want.shape, name
        assert np.array_equal(array, want), name
    # views of one storage: an offset window and a transpose of the same 12 numbers
    assert kinds["offset_view"].tolist() == [[4, 5, 6], [7, 8, 9]]
    assert kinds["transposed_view"][:, 1].tolist() == [4, 5, 6, 7]
    assert kinds["long"][2] == 2 ** 40 and kinds["double"][1, 1] == 1e-300


def test_both_formats_hold_the_same_state_dict():
    legacy = read_torch_file(fixture("swav_tiny_legacy.pth"))
    zipped = read_torch_file(fixture("swav_tiny_zip.pth"))
    assert list(legacy) == list(zipped) and len(legacy) == 112
    for name in legacy:
        assert legacy[name].dtype == zipped[name].dtype
        assert np.array_equal(legacy[name], zipped[name]), name


def test_eval_linear_checkpoint_unwraps_to_the_classifier():
    checkpoint = read_torch_file(fixture("linear_tiny_legacy.pth"))
    assert checkpoint["epoch"] == 100 and checkpoint["best_acc"] == 75.3
    momentum = checkpoint["optimizer"]["state"][1]["momentum_buffer"]  # tensors anywhere
    assert momentum.shape == (10,)
    state = torch_state_dict(checkpoint, "linear.pth")
    assert list(state) == ["linear.weight", "linear.bias"]  # 'module.' removed
    assert state["linear.weight"].shape == (10, 32)


def test_state_dict_under_model_key_and_errors():
    weight = np.zeros(2, np.float32)
    assert list(torch_state_dict({"model": {"module.a": weight}}, "f")) == ["a"]
    with pytest.raises(UserError, match=r"^f: no state dict in this PyTorch file \(holds a list\)"):
        torch_state_dict([weight], "f")
    with pytest.raises(UserError, match=r"^f: the state dict holds non-tensor entries \(b\)"):
        torch_state_dict({"a": weight, "b": 3}, "f")


class RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def legacy_bytes(obj):
    stream = io.BytesIO()
    for header in (LEGACY_MAGIC, 1001, {"little_endian": True}):
        pickle.dump(header, stream, protocol=2)
    pickle.dump(obj, stream, protocol=2)
    pickle.dump([], stream, protocol=2)
    return stream.getvalue()


def zip_bytes(obj):
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        archive.writestr("archive/byteorder", "little")
    return stream.getvalue()


@pytest.mark.parametrize("make", [legacy_bytes, zip_bytes])
def test_a_global_outside_the_allow_list_is_refused_unrun(tmp_path, make):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    path = tmp_path / "evil.pth"
    path.write_bytes(make({"state_dict": {"w": RunsCode()}}))
    with pytest.raises(UnsafeFileError, match=r"asks for the global posix\.system"):
        read_torch_file(str(path))
    assert not os.path.exists(MARKER)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.01, 0.3, 0.7, 0.99])
def test_truncated_files_are_one_clear_error(tmp_path, fmt, keep):
    data = open(fixture(f"swav_tiny_{fmt}.pth"), "rb").read()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[:max(5, int(len(data) * keep))])
    with pytest.raises(UserError, match=rf"^{path}: truncated or not a PyTorch checkpoint \([\w :]+\); "
                                        r"download it again$"):
        read_torch_file(str(path))


@pytest.mark.parametrize("content, message", [
    (b"hello, not weights\n", "neither a zip archive nor a pickle stream"),
    (pickle.dumps({"w": [1.0]}, protocol=2), "a pickle without PyTorch's magic number"),
    (b"PK\x03\x04" + b"\0" * 40, "truncated or not a PyTorch checkpoint"),
])
def test_other_files_are_not_checkpoints(tmp_path, content, message):
    path = tmp_path / "other.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_torch_file(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope.pth: file not found$"):
        read_torch_file(str(tmp_path / "nope.pth"))


def test_a_tensor_whose_storage_has_no_bytes_is_corrupt(tmp_path):
    """A legacy file whose storage list was emptied: the tensors point at nothing."""
    data = open(fixture("tensor_kinds_legacy.pth"), "rb").read()
    stream = io.BytesIO(data)
    for _ in range(4):  # magic, protocol, system info, the object
        for _ in pickletools.genops(stream):
            pass
    path = tmp_path / "hollow.pth"
    path.write_bytes(data[:stream.tell()] + pickle.dumps([], protocol=2))
    with pytest.raises(UserError, match=r"hollow.pth: corrupt PyTorch checkpoint \(a tensor's "
                                        r"storage has no data in the file\)"):
        read_torch_file(str(path))


def test_a_storage_type_numpy_lacks_is_named(tmp_path):
    data = open(fixture("tensor_kinds_legacy.pth"), "rb").read()
    assert data.count(b"torch\nHalfStorage\n") == 1  # GLOBAL is a text opcode: safe to rename
    path = tmp_path / "bf16.pth"
    path.write_bytes(data.replace(b"torch\nHalfStorage\n", b"torch\nBFloat16Storage\n"))
    with pytest.raises(UserError, match=r"bf16.pth: a BFloat16Storage tensor, which NumPy cannot "
                                        r"hold; convert it to float32 in PyTorch first"):
        read_torch_file(str(path))
