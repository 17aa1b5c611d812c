"""tools/check_data.py finds every unreadable image; the dataset key `exclude` leaves them out."""
import os
import subprocess
import sys

import pytest

from passl.data.datasets import ImageFolder, ImageList
from passl.data.image_io import DataError
from tiny_image_folder import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "check_data.py")


@pytest.fixture
def folder_with_bad_images(tmp_path):
    root = write_image_folder(tmp_path / "data", per_class=(4, 1))
    train = root / "train"
    (train / "0" / "empty.png").write_bytes(b"")
    (train / "2" / "text.jpg").write_text("not an image")
    good = (train / "1" / "0.png").read_bytes()
    (train / "1" / "cut.png").write_bytes(good[:len(good) // 3])
    return train, {"0/empty.png", "1/cut.png", "2/text.jpg"}


def run(*args, cwd):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_lists_every_bad_image_and_the_dataset_leaves_them_out(folder_with_bad_images, tmp_path):
    train, bad = folder_with_bad_images
    proc = run(str(train), "--output", "bad.txt", "--processes", "2", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "12 of 15 images decode; 3 do not" in proc.stdout
    listed = (tmp_path / "bad.txt").read_text().split()
    assert set(listed) == bad
    dataset = ImageFolder(str(train), exclude=str(tmp_path / "bad.txt"))
    assert len(dataset) == 12
    for index in range(len(dataset)):  # every remaining image decodes
        dataset[index]


def test_a_list_file_and_a_clean_folder(folder_with_bad_images, tmp_path):
    train, bad = folder_with_bad_images
    list_file = tmp_path / "list.txt"
    list_file.write_text("0/0.png 0\n0/empty.png 0\n2/text.jpg 2\n")
    proc = run(str(list_file), "--root", str(train), "--output", "bad.txt", cwd=tmp_path)
    assert proc.returncode == 1
    assert set((tmp_path / "bad.txt").read_text().split()) == {"0/empty.png", "2/text.jpg"}
    assert len(ImageList(str(train), str(list_file), exclude=str(tmp_path / "bad.txt"))) == 1
    clean = write_image_folder(tmp_path / "clean", per_class=(2, 1)) / "train"
    proc = run(str(clean), cwd=tmp_path)
    assert proc.returncode == 0 and "6 of 6 images decode; 0 do not" in proc.stdout
    assert not (tmp_path / "bad_images.txt").exists()


def test_missing_exclude_file_is_one_clear_error(folder_with_bad_images, tmp_path):
    train, _ = folder_with_bad_images
    with pytest.raises(DataError, match="exclude file not found: .*check_data.py"):
        ImageFolder(str(train), exclude=str(tmp_path / "nope.txt"))



def test_workers_shut_down_without_a_word(tmp_path):
    """The decoding workers end quietly: they are forked from a process that imported Paddle,
    whose SIGTERM handler printed a "FatalError: Termination signal" block when the pool
    ended (in most runs, not all: hence several pools in one process)."""
    clean = write_image_folder(tmp_path / "clean", per_class=(20, 1)) / "train"
    script = ("import os, sys, paddle\n"
              "from passl.data.check import find_unreadable\n"
              "root = sys.argv[1]\n"
              "paths = [os.path.join(c, f) for c in os.listdir(root)"
              " for f in os.listdir(os.path.join(root, c))]\n"
              "print(sum(len(find_unreadable(root, paths, 2)) for _ in range(8)), len(paths))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(clean)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr  # Paddle printed its block on stdout
    assert "Termination signal" not in output and "FatalError" not in output
    assert proc.stdout.split() == ["0", "60"]  # every image decodes, in every pool
