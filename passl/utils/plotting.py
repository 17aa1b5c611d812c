"""matplotlib for the drawing modules: imported on demand, headless, saved as PNG.

matplotlib is an optional extra (``pip install -e .[plot]``); only the modules that draw
import it, through :func:`pyplot`, so training and evaluation never need it.
"""
import logging
import os

from passl.errors import UserError


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or a one-line UserError."""
    # matplotlib logs "building the font cache" on its first import: harmless, and noise
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -e .[plot] "
                        "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(figure, output_path, dpi=100):
    """Write ``figure`` to ``output_path`` (parent folders created) and close it."""
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    figure.savefig(output_path, dpi=dpi)
    pyplot().close(figure)
