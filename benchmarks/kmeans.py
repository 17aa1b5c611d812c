"""``tools/benchmark.py kmeans``: DeepCluster-v2's k-means time per epoch, measured on a
synthetic bank and projected to ImageNet.

One process clusters a random bank of ``--rows`` unit vectors of ``--dim`` into
``--centroids`` centroids for ``--iterations`` iterations (``spherical_kmeans``, exactly as
training runs it), ``--repeats`` times; the median is reported. The work grows linearly with
the rows (the E step, ``rows x centroids x dim`` multiply-adds per iteration, dominates), so
the time for a process holding R rows is the measured time x R / rows. The projection uses
the paper's setting: 1.28M images, 3 heads, and the per-process share over 1, 8 and 64
processes; the all-reduce of the M step adds ``centroids x (dim + 1)`` float64 per
iteration and the gather ``2 x rows x 8`` bytes per head, independent of the compute.
Memory per process: the bank (``rows x (8 + 4 x crops x dim)`` bytes), the assignment table
(``images x heads x 8``) and the E step's score block (``min(rows, 65536) x centroids x 4``).

Alternating with each k-means run, one plain ``bank @ centroids^T`` matmul of the same shape is
timed: ``overhead_vs_matmuls`` = k-means time / (iterations + 1) matmuls, a ratio that holds
on a loaded machine and turns a device's matmul throughput into a k-means time.

JSON (last line): ``seconds_per_head`` (measured), ``gflops_per_s``, ``matmul_seconds``,
``overhead_vs_matmuls``, and under ``imagenet``
one entry per process count with ``rows_per_process``, ``seconds_per_epoch`` (3 heads, this
machine) and ``bank_mb``.
"""
import json
import statistics
import time

IMAGENET_IMAGES = 1_281_167
PROCESS_COUNTS = (1, 8, 64)


def add_arguments(parser):
    parser.add_argument("--rows", type=int, default=50_000, help="bank rows (default 50000)")
    parser.add_argument("--dim", type=int, default=128, help="embedding size (default 128)")
    parser.add_argument("--centroids", type=int, default=3000, help="K (default 3000)")
    parser.add_argument("--iterations", type=int, default=10, help="k-means iterations (10)")
    parser.add_argument("--heads", type=int, default=3, help="heads per epoch (default 3)")
    parser.add_argument("--crops", type=int, default=2, help="assignment crops in the bank (2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median; default 3)")


def main(args):
    import numpy as np
    import paddle

    from passl.models.losses.deepclusterv2 import E_STEP_ROWS, spherical_kmeans
    from passl.runtime import configure_cpu_threads
    threads = configure_cpu_threads("auto")["threads"]
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank = paddle.to_tensor(bank)
    start = rng.permutation(args.rows)[:args.centroids]
    spherical_kmeans(bank, start, 1)  # warm-up
    centroids = paddle.gather(bank, paddle.to_tensor(start))
    times, matmuls = [], []
    for _ in range(args.repeats):  # alternating, so both see the same machine load
        began = time.perf_counter()
        spherical_kmeans(bank, start, args.iterations)
        times.append(time.perf_counter() - began)
        began = time.perf_counter()
        paddle.matmul(bank, centroids, transpose_y=True)  # CPU kernels are synchronous
        matmuls.append(time.perf_counter() - began)
    per_head = statistics.median(times)
    matmul = statistics.median(matmuls)
    flops = 2.0 * args.rows * args.centroids * args.dim * (args.iterations + 1)
    overhead = per_head / (matmul * (args.iterations + 1))
    print(f"k-means of {args.rows} x {args.dim} rows into {args.centroids} centroids, "
          f"{args.iterations} iterations, {paddle.device.get_device()}, {threads} thread(s): "
          f"{per_head:.3f} s per head (median of {args.repeats}), "
          f"{flops / per_head / 1e9:.1f} GFLOP/s in the E steps; "
          f"{overhead:.2f} x the time of its {args.iterations + 1} score matmuls alone "
          f"({matmul:.3f} s each)")
    print(f"ImageNet projection ({IMAGENET_IMAGES} images, {args.heads} heads, "
          f"{args.centroids} centroids, {args.iterations} iterations, {args.crops} x "
          f"{args.dim}-d bank):")
    print(f"{'processes':>9} {'rows/process':>12} {'GFLOP/process':>13} {'s/epoch here':>12} "
          f"{'bank MB':>8} {'table MB':>8} {'scores MB':>9}")
    imagenet = {}
    for processes in PROCESS_COUNTS:
        rows = -(-IMAGENET_IMAGES // processes)
        seconds = per_head * rows / args.rows * args.heads
        gflop = flops * rows / args.rows * args.heads / 1e9
        bank_mb = rows * (8 + 4 * args.crops * args.dim) / 2 ** 20
        table_mb = IMAGENET_IMAGES * args.heads * 8 / 2 ** 20
        scores_mb = min(rows, E_STEP_ROWS) * args.centroids * 4 / 2 ** 20
        print(f"{processes:>9} {rows:>12} {gflop:>13.0f} {seconds:>12.1f} {bank_mb:>8.1f} "
              f"{table_mb:>8.1f} {scores_mb:>9.1f}")
        imagenet[str(processes)] = {"rows_per_process": rows, "gflop_per_process": gflop,
                                    "seconds_per_epoch": seconds, "bank_mb": bank_mb,
                                    "table_mb": table_mb, "scores_mb": scores_mb}
    if args.json:
        print(json.dumps({"seconds_per_head": per_head, "gflops_per_s": flops / per_head / 1e9,
                          "matmul_seconds": matmul, "overhead_vs_matmuls": overhead,
                          "rows": args.rows, "dim": args.dim, "centroids": args.centroids,
                          "iterations": args.iterations, "threads": threads,
                          "imagenet": imagenet}))
    return 0
