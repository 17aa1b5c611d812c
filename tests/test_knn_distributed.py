"""kNN across two CPU processes (gloo) equals kNN on the concatenated data in one process."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import paddle
import pytest

from passl import distributed
from passl.evaluation import knn
from test_knn import Identity, batches, clustered

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from passl import distributed
    distributed.init_process_group()
    from passl.evaluation.knn import knn_evaluate
    from test_knn import Identity, batches
    data = np.load(sys.argv[2])
    rank = distributed.get_rank()
    # Unequal shares per rank: the gather must cope with different row counts.
    train_share = slice(0, 70) if rank == 0 else slice(70, None)
    val_share = slice(0, 21) if rank == 0 else slice(21, None)
    result = knn_evaluate(Identity(), batches(data["train_x"][train_share], data["train_y"][train_share], 16),
                          batches(data["val_x"][val_share], data["val_y"][val_share], 8))
    if rank == 0:
        with open(sys.argv[3], "w") as f:
            json.dump(result, f)
""")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((6, 8))
    train_x, train_y = clustered(rng, 120, centres, noise=1.0)
    val_x, val_y = clustered(rng, 50, centres, noise=1.0)
    np.savez(tmp_path / "data.npz", train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y)
    from passl.evaluation.knn import knn_evaluate
    expected = knn_evaluate(Identity(), batches(train_x, train_y, 32), batches(val_x, val_y, 32))

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
         "--log_dir", str(tmp_path / "log"), str(script), os.path.dirname(__file__),
         str(tmp_path / "data.npz"), str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    logs = "".join(p.read_text() for p in (tmp_path / "log").glob("workerlog.*"))
    assert proc.returncode == 0, proc.stderr[-2000:] + logs[-2000:]
    result = json.loads(out.read_text())
    assert result == pytest.approx(expected)
    assert result["count"] == 50


@pytest.mark.parametrize("counts", [(4, 4, 4), (5, 4, 4), (4, 5, 3), (0, 6, 5)])
def test_the_gathered_bank_is_held_once_in_rank_order(monkeypatch, counts):
    """gather_rows on rank 1 of three simulated ranks: every rank's rows in rank order, in the
    very tensor the ranks gathered their common rows into (no second copy of the bank), also
    when counts differ and blocks move apart in several overlapping chunks."""
    rng = np.random.default_rng(0)
    shares = [rng.standard_normal((n, 3)).astype("float32") for n in counts]
    common, extra = min(counts), max(counts) - min(counts)
    outputs = []

    def all_gather(tensor, out=None):  # the collective: rank 1 sends ``tensor``
        if out is not None:  # the rows every rank has
            np.testing.assert_array_equal(tensor.numpy(), shares[1][:common])
            out.set_value(np.concatenate([share[:common] for share in shares]))
            outputs.append(out)
            return out
        rests = [np.pad(share[common:], ((0, extra - len(share) + common), (0, 0)))
                 for share in shares]
        np.testing.assert_array_equal(tensor.numpy(), rests[1])
        return paddle.to_tensor(np.concatenate(rests))
    monkeypatch.setattr(distributed, "get_world_size", lambda: len(counts))
    monkeypatch.setattr(distributed, "all_gather_object", lambda count: list(counts))
    monkeypatch.setattr(distributed, "all_gather", all_gather)
    monkeypatch.setattr(knn, "MOVE_CHUNK", 3)  # moves in several, overlapping chunks
    bank = knn.gather_rows(paddle.to_tensor(shares[1]))
    np.testing.assert_array_equal(bank.numpy(), np.concatenate(shares))
    if common:
        assert bank.data_ptr() == outputs[0].data_ptr()
