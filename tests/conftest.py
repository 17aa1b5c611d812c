"""Test-wide settings: Paddle's fast CPU path and a headless, single-threaded OpenCV."""
import os

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")  # before paddle is imported (DESIGN §5)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tests share 2 cores; results do not depend on it
