"""Read an image file into an 8-bit RGB array, or say clearly why it cannot be read.

OpenCV decodes (``cv2.imdecode`` on the raw bytes, which also works for non-ASCII
paths); Pillow is the fallback for formats OpenCV cannot read. Grayscale, RGBA,
palette and 16-bit/float images all come out as HWC uint8 RGB. EXIF orientation is
ignored, as Pillow and torchvision do, so the pixels match the reference pipeline.
"""
import io

import cv2
import numpy as np

from passl.errors import UserError

#: File name endings the folder datasets treat as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# OpenCV >= 4.10 decodes straight to RGB; older versions decode BGR and we swap.
_RGB_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", None)
_DECODE_FLAGS = ((_RGB_FLAG if _RGB_FLAG is not None else cv2.IMREAD_COLOR)
                 | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION)


class DataError(UserError):
    """An unreadable data file; the message is one line naming the file.

    Paddle's DataLoader re-raises a worker's exception as ``type(full_traceback_text)``;
    that text is reduced back to our original last line so the user still sees one
    clear line.
    """

    def __init__(self, message):
        super().__init__(_original_line(message))


def _original_line(text):
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return str(text).strip()
    marker = f"{DataError.__name__}: "
    last = lines[-1]
    return last.split(marker, 1)[1] if marker in last else last


def jpeg_is_complete(data):
    """True unless ``data`` is a JPEG cut off before its end-of-image marker.

    OpenCV 4.x returns a half-grey image for a truncated JPEG instead of failing.
    Inside entropy-coded data 0xFF is always escaped, so the last start-of-scan
    marker (FFDA) followed by no end-of-image marker (FFD9) means the file is cut.
    """
    if data[:2] != b"\xff\xd8":
        return True
    last_scan = data.rfind(b"\xff\xda")
    return last_scan < 0 or data.find(b"\xff\xd9", last_scan) >= 0


def to_uint8_rgb(img):
    """HWC uint8 RGB from any 2-D/3-D integer or float array (alpha dropped)."""
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.integer):
            img = np.rint(img.astype(np.float32) * (255.0 / np.iinfo(img.dtype).max))
        else:  # float images are taken to be in [0, 1]
            img = np.clip(img, 0.0, 1.0) * 255.0 + 0.5
        img = img.astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(img[:, :, :3])


def _decode_with_pillow(data):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(image)
                if image.mode == "I":  # 32-bit containers of 16-bit data (e.g. PNG)
                    array = array.astype(np.uint16 if array.max() <= 65535 else np.uint32)
                return to_uint8_rgb(array)
            return np.asarray(image.convert("RGBA" if "transparency" in image.info else image.mode)
                              .convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError("not an image file (neither OpenCV nor Pillow knows its format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode: {e}") from None


def decode_image(data):
    """Decode encoded image bytes to HWC uint8 RGB; ValueError with the reason otherwise."""
    if not data:
        raise ValueError("empty file")
    if not jpeg_is_complete(data):
        raise ValueError("truncated JPEG (no end-of-image marker)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _DECODE_FLAGS)
    if img is None:
        return _decode_with_pillow(data)
    if _RGB_FLAG is None and img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return to_uint8_rgb(img)


def read_image(path):
    """Read and decode ``path`` to HWC uint8 RGB; DataError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None
    try:
        return decode_image(data)
    except ValueError as e:
        raise DataError(f"{path}: {e}; replace or delete the file, list every bad image with "
                        f"tools/check_data.py (then exclude: FILE in the dataset block), or skip "
                        f"unreadable images with -o dataloader.train.dataset.skip_corrupt=true") from None
