"""``tools/benchmark.py data``: SwAV multi-crop throughput on real JPEG files.

Both pipelines read the same 500x375 JPEGs from disk and produce SwAV's 2x224 + 6x96
crops (RandomResizedCrop, flip, colour jitter p 0.8, grayscale p 0.2, blur p 0.5,
normalise) as float32 CHW: PASSL's OpenCV pipeline through ``ImageFolder`` +
``MultiCrop`` (exactly the training path), and the baseline with Pillow +
``paddle.vision.transforms`` (blur through Pillow's filter, as the SwAV reference does).
Everything runs in this process on one thread; rounds alternate between the two and
the median images/s of each is reported.

``--dataset shards`` compares PASSL's own pipeline reading the same JPEGs from tar shards
(``TarShards``) against reading them as files (``ImageFolder``), and adds the rates of
reading the encoded bytes alone with a warm and a cold page cache (the files' pages are
dropped with ``posix_fadvise``), which is where the two differ.
"""
import json
import os
import random
import statistics
import tempfile
import time

import numpy as np

PHOTO_WIDTH, PHOTO_HEIGHT = 500, 375  # ImageNet's most common size
SWAV_RECIPE = {"nmb_crops": [2, 6], "size_crops": [224, 96],
               "min_scale_crops": [0.14, 0.05], "max_scale_crops": [1.0, 0.14]}


def add_arguments(parser):
    parser.add_argument("--images", type=int, default=64, help="JPEGs per round (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per pipeline (default 5)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the test images")
    parser.add_argument("--dataset", choices=("folder", "shards"), default="folder",
                        help="folder: PASSL vs Pillow, both on image files (default); shards: "
                             "PASSL on TarShards vs PASSL on ImageFolder, plus raw read rates")


def single_thread():
    """One thread for OpenCV, OpenMP/MKL and Paddle: the benchmark is per core."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    import cv2
    import paddle

    cv2.setNumThreads(1)
    paddle.base.core.set_num_threads(1)


def make_photos(directory, count, quality, seed=0):
    """``count`` photo JPEGs of 500x375: random 4:3 crops (40-100% of the area) of
    scikit-learn's two bundled photographs, flipped and colour-shifted at random."""
    import cv2
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    sources = load_sample_images().images
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(count):
        source = sources[i % len(sources)]
        height, width = source.shape[:2]
        crop_w = int(min(width, height * 4 / 3) * np.sqrt(rng.uniform(0.4, 1.0)))
        crop_h = int(crop_w * 3 / 4)
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        photo = cv2.resize(source[top:top + crop_h, left:left + crop_w], (PHOTO_WIDTH, PHOTO_HEIGHT),
                           interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            photo = photo[:, ::-1]
        photo = np.clip(photo * rng.uniform(0.8, 1.2, size=3), 0, 255).astype(np.uint8)
        path = os.path.join(directory, f"photo_{i:04d}.jpg")
        cv2.imwrite(path, cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        paths.append(path)
    return paths


def passl_pipeline(root):
    """index -> crops, through the dataset exactly as training reads it."""
    from passl.data.datasets import ImageFolder

    dataset = ImageFolder(root, transforms=[dict(name="MultiCrop", **SWAV_RECIPE)])
    return dataset.__getitem__


def shards_pipeline(root, shard_dir):
    """The TarShards dataset (multi-crop) of ``root``'s images, packed into ``shard_dir``."""
    from passl.data.datasets import ImageFolder
    from passl.data.shards import TarShards
    from passl.io.tar_shards import image_extension, write_shards

    folder = ImageFolder(root)
    samples = ((image_extension(folder.path(i)), open(folder.path(i), "rb").read(), 0)
               for i in range(len(folder)))
    write_shards(samples, shard_dir, shard_size=1000)
    return TarShards(shard_dir, transforms=[dict(name="MultiCrop", **SWAV_RECIPE)])


def drop_from_page_cache(paths):
    """Ask the kernel to forget these files' cached pages (cold reads; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_rates(paths, shards, rounds):
    """Images/s of reading the encoded bytes only (no decode), warm and cold page cache:
    one open + read + close per file against seek + read in open shards."""
    shard_files = [os.path.join(shards.root, str(n)) for n in shards.reader.names]

    def files():
        for path in paths:
            with open(path, "rb") as f:
                f.read()

    def packed():
        for number in range(len(shards)):
            shards.reader.read(number)

    rates = {}
    for name, read, cached in (("folder", files, paths), ("shards", packed, shard_files)):
        for cache in ("warm", "cold"):
            timings = []
            for _ in range(rounds):
                if cache == "cold":
                    shards.reader.close()
                    drop_from_page_cache(cached)
                start = time.perf_counter()
                read()
                timings.append(len(paths) / (time.perf_counter() - start))
            rates[f"{name}_{cache}"] = round(statistics.median(timings), 1)
    return rates


def baseline_pipeline(paths):
    """index -> crops with Pillow + paddle.vision.transforms (the SwAV reference recipe)."""
    import paddle.vision.transforms as T
    from PIL import Image, ImageFilter

    from passl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    crops = [(count, T.RandomResizedCrop(size, scale=(low, high)))
             for count, size, low, high in zip(*SWAV_RECIPE.values())]
    flip = T.RandomHorizontalFlip()
    jitter = T.ColorJitter(0.8, 0.8, 0.8, 0.2)
    grayscale = T.Grayscale(num_output_channels=3)
    to_tensor, normalize = T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def distort(img):
        img = flip(img)
        if random.random() < 0.8:
            img = jitter(img)
        if random.random() < 0.2:
            img = grayscale(img)
        if random.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return normalize(to_tensor(img))

    def load(index):
        with Image.open(paths[index]) as image:
            img = image.convert("RGB")
        return [distort(crop(img)) for count, crop in crops for _ in range(count)], 0

    return load


def images_per_second(pipeline, count):
    start = time.perf_counter()
    for index in range(count):
        pipeline(index)
    return count / (time.perf_counter() - start)


def measure(images, rounds, quality, dataset="folder"):
    """Median images/s of both pipelines over alternating rounds (after one warm-up image)."""
    single_thread()
    reads = None
    with tempfile.TemporaryDirectory(prefix="passl_bench_data_") as root, \
            tempfile.TemporaryDirectory(prefix="passl_bench_shards_") as shard_dir:
        paths = make_photos(os.path.join(root, "photos"), images, quality)
        if dataset == "shards":  # ours = TarShards, baseline = ImageFolder, both PASSL
            shards = shards_pipeline(root, shard_dir)
            reads = read_rates(paths, shards, rounds)
            ours, baseline = shards.__getitem__, passl_pipeline(root)
        else:
            ours, baseline = passl_pipeline(root), baseline_pipeline(paths)
        ours(0), baseline(0)
        timings = {"ours": [], "baseline": []}
        for _ in range(rounds):
            timings["ours"].append(images_per_second(ours, images))
            timings["baseline"].append(images_per_second(baseline, images))
        mean_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
    ours_ips, baseline_ips = statistics.median(timings["ours"]), statistics.median(timings["baseline"])
    result = {
        "benchmark": "data",
        "dataset": dataset,
        "images_per_s": round(ours_ips, 2),
        "baseline_images_per_s": round(baseline_ips, 2),
        "ratio": round(ours_ips / baseline_ips, 3),
        "crops": "2x224+6x96",
        "image_size": f"{PHOTO_WIDTH}x{PHOTO_HEIGHT}",
        "jpeg_kb": round(mean_kb, 1),
        "images": images,
        "rounds": rounds,
        "threads": 1,
    }
    if reads:
        result["read_images_per_s"] = reads
    return result


def print_table(result):
    if result["dataset"] == "shards":
        rows = [("PASSL OpenCV (TarShards + MultiCrop)", result["images_per_s"]),
                ("PASSL OpenCV (ImageFolder + MultiCrop)", result["baseline_images_per_s"])]
    else:
        rows = [("PASSL OpenCV (ImageFolder + MultiCrop)", result["images_per_s"]),
                ("Pillow + paddle.vision.transforms", result["baseline_images_per_s"])]
    print(f"SwAV multi-crop {result['crops']} on {result['images']} JPEGs of {result['image_size']} "
          f"(~{result['jpeg_kb']} KB), 1 thread, median of {result['rounds']} rounds")
    print(f"{'pipeline':<40} {'images/s':>10} {'ms/image':>10}")
    for name, ips in rows:
        print(f"{name:<40} {ips:>10.1f} {1000 / ips:>10.2f}")
    print(f"{'ratio':<40} {result['ratio']:>10.2f}x")
    for name, ips in result.get("read_images_per_s", {}).items():
        source, cache = name.split("_")
        print(f"{'read only, ' + source + ', ' + cache + ' cache':<40} {ips:>10.1f} "
              f"{1000 / ips:>10.3f}")


def main(args):
    if args.images < 1 or args.rounds < 1:
        raise SystemExit("error: --images and --rounds must be at least 1")
    result = measure(args.images, args.rounds, args.quality, args.dataset)
    print_table(result)
    if args.json:
        print(json.dumps(result))
    return 0
