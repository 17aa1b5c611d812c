"""``tools/predict.py``: run an exported model over image files, in batches.

Inputs are image files and folders (searched recursively, files sorted). An input that cannot
be read as an image is reported on stderr by name with the reason and skipped; the other
images are still predicted. An empty folder, or no readable image at all, is an error.
"""
import os
import sys

import numpy as np

from passl.data.image_io import IMAGE_EXTENSIONS, decode_image
from passl.data.transforms import build_pipeline
from passl.deploy.engine import InferenceEngine
from passl.errors import UserError
from passl.io.inference_model import read_model_dir
from passl.io.onnx_model import is_onnx_dir, read_onnx_dir


def list_images(inputs):
    """Files to predict, in order: each file argument as given, each folder's images sorted."""
    files = []
    for path in inputs:
        if not os.path.isdir(path):
            files.append(path)  # a missing or non-image file is reported when it is read
            continue
        found = sorted(os.path.join(parent, name)
                       for parent, _, names in os.walk(path, followlinks=True)
                       for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise UserError(f"folder {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"pass a folder with images or image files")
        files.extend(found)
    return files


def read_rgb(path):
    """HWC uint8 RGB of ``path``, or ValueError saying why it is not a readable image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except OSError as e:
        raise ValueError(f"cannot read: {e.strerror or e}") from None
    return decode_image(data)


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Predictor:
    """An exported model directory, ready to run: its engine (Paddle Inference, or
    onnxruntime for an ONNX export) and its preprocessing."""

    def __init__(self, model_dir, device="auto", batch_size=16, precision="float32",
                 trust_model=False):
        if is_onnx_dir(model_dir):
            if precision != "float32":
                raise UserError(f"--precision {precision}: an ONNX export runs in float32 "
                                f"with onnxruntime")
            from passl.deploy.onnx_runtime import OnnxEngine
            path, self.meta = read_onnx_dir(model_dir)
            self.engine = OnnxEngine(path, device=device)
        else:
            graph, params, self.meta = read_model_dir(model_dir)
            self.engine = InferenceEngine(graph, params, device=device, precision=precision,
                                          trust_model=trust_model)
        self.input_shape = list(self.meta["input"]["shape"])
        fixed_batch = self.input_shape[0]
        self.batch_size = fixed_batch if fixed_batch > 0 else batch_size
        self.transform = build_pipeline(self.meta["transforms"])
        self.class_names = self.meta.get("class_names")

    def preprocess(self, image):
        out = self.transform(image, np.random.default_rng(0))
        if list(out.shape) != self.input_shape[1:]:
            raise UserError(f"inference.yml transforms give {list(out.shape)}, the model takes "
                            f"{self.input_shape[1:]}; re-export the model")
        return out

    def run(self, images):
        """Outputs for a list of preprocessed images (padded to a fixed batch when needed)."""
        batch = np.stack(images)
        padding = self.batch_size - len(images) if self.input_shape[0] > 0 else 0
        if padding:
            batch = np.concatenate([batch, np.zeros((padding, *batch.shape[1:]), batch.dtype)])
        return self.engine(batch)[:len(images)]

    def predict_files(self, files, report=None):
        """``(readable files, outputs [N, ...])``; unreadable files go to ``report(path,
        reason)`` (default: one ``skipped`` line on stderr) and are left out."""
        report = report or (lambda path, reason: print(f"skipped {path}: {reason}",
                                                       file=sys.stderr, flush=True))
        kept, outputs, pending = [], [], []
        for path in files:
            try:
                pending.append(self.preprocess(read_rgb(path)))
            except ValueError as e:
                report(path, e)
                continue
            kept.append(path)
            if len(pending) == self.batch_size:
                outputs.append(self.run(pending))
                pending = []
        if pending:
            outputs.append(self.run(pending))
        if not kept:
            raise UserError(f"none of the {len(files)} input(s) is a readable image")
        return kept, np.concatenate(outputs)

    def label(self, index):
        return self.class_names[index] if self.class_names else str(index)

    def top_k(self, logits, k):
        """Per row: ``[(label, probability)]`` of the ``k`` most probable classes."""
        probabilities = softmax(logits.astype(np.float64))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.label(int(i)), float(row[i])) for i in top]
                for row, top in zip(probabilities, order)]


def file_list_path(features_path):
    """Where the row-order file list of ``--features OUT.npy`` goes: ``OUT.txt``."""
    return os.path.splitext(features_path)[0] + ".txt"


def write_features(path, files, features):
    """``path`` (.npy, float32 rows in ``files`` order) and its file list; returns the list path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, features.astype(np.float32))
    list_path = file_list_path(path)
    with open(list_path, "w") as f:
        f.writelines(name + "\n" for name in files)
    return list_path
