"""Find the unreadable images of a dataset before training meets them hours into an epoch.

``tools/check_data.py`` decodes every image of an ImageFolder root or an ImageList file on
all cores with the same reader the datasets use (:func:`passl.data.image_io.read_image`) and
writes the bad ones, relative to the root, one per line: the ``exclude`` file that every
folder or list dataset accepts (``exclude: bad_images.txt``) to leave them out.
"""
import multiprocessing
import os
import signal

from passl.data.image_io import DataError, read_image


def _problem(path):
    """None when ``path`` decodes, else the one-line reason."""
    try:
        read_image(path)
        return None
    except DataError as e:
        return str(e)


def _quiet_worker():
    """Pool initializer: the default SIGTERM action in a decoding worker.

    The workers are forked from a process that imported Paddle, whose SIGTERM handler prints
    a C++ "FatalError: Termination signal" block; a pool left early (an error, Ctrl-C)
    terminates its workers, which is no fault of theirs worth a report.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def find_unreadable(root, relative_paths, processes=None, chunksize=64):
    """``[(relative path, reason)]`` of the images under ``root`` that cannot be decoded.

    Args:
        processes: decoding processes (default: every core this process may use).
    """
    paths = [os.path.join(root, p) for p in relative_paths]
    processes = processes or len(os.sched_getaffinity(0))
    if processes == 1:
        problems = map(_problem, paths)
    else:
        with multiprocessing.get_context("fork").Pool(processes, _quiet_worker) as pool:
            problems = pool.map(_problem, paths, chunksize=chunksize)
            pool.close()  # the workers finish on their own: no SIGTERM on the normal path
            pool.join()
    return [(rel, reason) for rel, reason in zip(relative_paths, problems) if reason]


def write_exclude_list(bad, path):
    """Write the relative paths of ``bad`` (``[(path, reason)]``) one per line to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{rel}\n" for rel, _ in bad)


def read_exclude_list(path, owner):
    """The set of relative paths listed in an ``exclude`` file (blank lines ignored)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DataError(f"{owner}: exclude file not found: {path}; write one with "
                        f"tools/check_data.py or remove the exclude key")
    with open(path, encoding="utf-8") as f:
        return {os.path.normpath(line.strip()) for line in f if line.strip()}
