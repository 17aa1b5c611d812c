"""PASSL-SwAV: self-supervised SwAV pretraining and evaluation in PaddlePaddle."""
import warnings

__version__ = "0.1.0"

# Paddle warns on import when the C++-extension compiler cache is missing; we build no
# extensions, and the line would precede every tool's output (and its one-line errors).
warnings.filterwarnings("ignore", message="No ccache found")
