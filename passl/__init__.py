"""PASSL-SwAV: self-supervised SwAV pretraining and evaluation in PaddlePaddle."""
import warnings

__version__ = "0.1.0"

# Paddle warns on import when the C++-extension compiler cache is missing; we build no
# extensions, and the line would precede every tool's output (and its one-line errors).
warnings.filterwarnings("ignore", message="No ccache found")
# Paddle's BatchNorm warns on its first training step that it tracks running statistics,
# which is what every BatchNorm does; the line lands inside the first progress bar.
warnings.filterwarnings("ignore", message="When training, we now always track global mean")
