"""Runs model directories for tests/test_model_dir_fuzz.py, one per stdin line, each in a
child forked for it (a crash ends that child, not the test run, and no case sees what an
earlier one left in Paddle's memory).

argv: IMAGES_DIR REFERENCE.npy. Each stdin line is a directory; each answer one line
``fuzz-answer: {"result": ..., "detail": ...}``, the result ``equal``, ``different`` (from
REFERENCE.npy), ``error`` (one UserError line), ``exception`` (anything else) or ``crash``
(the child was killed by a signal). The child's address space is capped so that a case
asking for gigabytes fails there instead of swapping the machine.
"""
import json
import os
import resource
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

from passl.deploy.predict import Predictor  # noqa: E402
from passl.errors import UserError  # noqa: E402

#: Marks the answer lines (Paddle prints to stdout too).
ANSWER = "fuzz-answer: "
#: What a case may allocate beyond what the worker took with Paddle imported.
HEADROOM_BYTES = 3 * 2 ** 30


def run(directory, files, reference):
    try:
        _, outputs = Predictor(directory, device="cpu", batch_size=4).predict_files(
            files, report=lambda path, reason: None)
    except UserError as error:
        text = str(error)
        return {"result": "error" if "\n" not in text else "exception", "detail": text}
    except Exception:  # noqa: BLE001 - anything else is what the fuzzer looks for
        return {"result": "exception", "detail": traceback.format_exc()[-1500:]}
    same = outputs.shape == reference.shape and np.array_equal(outputs, reference)
    return {"result": "equal" if same else "different", "detail": str(outputs.shape)}


def run_in_child(directory, files, reference, limit):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the case, answer through the pipe
        os.close(read_end)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        answer = run(directory, files, reference)
        answer["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        os.write(write_end, json.dumps(answer).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"result": "crash", "detail": f"killed by signal {os.WTERMSIG(status)}"}
    return json.loads(data) if data else {"result": "crash", "detail": f"status {status}"}


def main():
    images, reference = sys.argv[1], np.load(sys.argv[2])
    files = sorted(os.path.join(images, name) for name in os.listdir(images))
    with open("/proc/self/statm") as f:
        limit = int(f.read().split()[0]) * resource.getpagesize() + HEADROOM_BYTES
    for line in sys.stdin:
        answer = run_in_child(line.strip(), files, reference, limit)
        print(ANSWER + json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
