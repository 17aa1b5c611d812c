"""Test-wide settings: Paddle's fast CPU path and a headless, single-threaded OpenCV; shared
fixtures."""
import os

import pytest

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")  # before paddle is imported (DESIGN §5)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tests share 2 cores; results do not depend on it


#: Tensor methods that copy a value to the host (each one waits for the GPU's queued work);
#: ``int()``/``float()`` of a tensor go through them too.
HOST_READS = ("numpy", "item", "tolist", "__float__")


@pytest.fixture
def host_reads(monkeypatch):
    """A list that records every read of a tensor's value on the host."""
    import paddle  # after the environment above is set
    reads = []
    for name in HOST_READS:
        original = getattr(paddle.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(paddle.Tensor, name, counted)
    return reads
