"""Peak memory of gathering a kNN memory bank across processes, relative to the bank's size.

    python benchmarks/knn_bank_memory.py [--nproc 2] [--rows 200003] [--dim 512]

Starts ``--nproc`` processes with ``paddle.distributed.launch`` (gloo on CPU). Each holds its
share of a synthetic ``rows x dim`` float32 bank, split as the evaluation loaders split images
(rank r gets samples r, r + nproc, ...: shares differ by one row unless ``rows`` is a multiple
of ``nproc``), and calls ``passl.evaluation.knn.gather_rows``. Paddle's allocator statistics
(host memory on CPU, the card's on GPU) give the peak allocated during the call above what was
allocated before it (this rank's share). Prints one line per rank and, last, one JSON object:
``bank_mb``, ``peak_over_bank`` (the largest rank's peak during the gather / bank size) and
``rows_per_rank``.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (2)")
    parser.add_argument("--rows", type=int, default=200003, help="bank rows in all (200003)")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension (512)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a rank: its JSON output file
    return parser.parse_args(argv)


def allocated(stat):
    """``stat`` ('current' or 'peak') of Paddle's allocator on this process's device."""
    import paddle
    core = paddle.base.core
    if paddle.get_device().startswith("gpu"):
        card = paddle.distributed.ParallelEnv().device_id
        return getattr(core, f"device_memory_stat_{stat}_value")("Allocated", card)
    return getattr(core, f"host_memory_stat_{stat}_value")("Allocated", 0)


def reset_peak():
    import paddle
    core = paddle.base.core
    if paddle.get_device().startswith("gpu"):
        core.device_memory_stat_reset_peak_value("Allocated",
                                                 paddle.distributed.ParallelEnv().device_id)
    else:
        core.host_memory_stat_reset_peak_value("Allocated", 0)


def worker(args):
    sys.path.insert(0, ROOT)
    import numpy as np
    import paddle
    from passl import distributed
    from passl.evaluation.knn import gather_rows
    distributed.init_process_group()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    rows = len(range(rank, args.rows, world))
    share = paddle.to_tensor(np.full((rows, args.dim), rank + 1, dtype="float32"))
    before = allocated("current")
    reset_peak()
    bank = gather_rows(share)
    peak = allocated("peak") - before
    assert bank.shape == [args.rows, args.dim]
    with open(f"{args.worker}.rank{rank}", "w") as f:
        json.dump({"rank": rank, "rows": rows, "peak_bytes": peak}, f)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--log_dir",
                        os.path.join(tmp, "log"), "--nproc_per_node", str(args.nproc),
                        os.path.abspath(__file__), "--rows", str(args.rows), "--dim",
                        str(args.dim), "--worker", out], check=True, capture_output=True)
        ranks = []
        for rank in range(args.nproc):
            with open(f"{out}.rank{rank}") as f:
                ranks.append(json.load(f))
    bank = args.rows * args.dim * 4
    for r in ranks:
        print(f"rank {r['rank']}: {r['rows']} rows; peak during the gather "
              f"{r['peak_bytes'] / 2 ** 20:.1f} MB = {r['peak_bytes'] / bank:.3f} x the bank")
    print(json.dumps({"bank_mb": round(bank / 2 ** 20, 1),
                      "peak_over_bank": round(max(r["peak_bytes"] for r in ranks) / bank, 3),
                      "rows_per_rank": [r["rows"] for r in ranks]}))


if __name__ == "__main__":
    main()
