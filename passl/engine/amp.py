"""Mixed precision for the trainer: ``paddle.amp.auto_cast`` and, for float16, a GradScaler.

Config block ``amp`` (all optional)::

    amp: {enable: false, dtype: float16, level: O1}

On a GPU without the requested dtype the run falls back visibly (a warning and the
``mixed precision:`` log line say so): bfloat16 -> float16 with loss scaling (bfloat16 needs
compute capability 8.0+), float16 -> float32.

``dtype: float16`` scales the loss (``paddle.amp.GradScaler``) so small gradients survive;
``bfloat16`` has float32's range and needs no scaler. Only level ``O1`` (per-op casting,
float32 parameters) is supported: ``O2`` keeps float16 parameters, which LARS would update
without float32 master weights. Paddle 3.x has no autocast kernels on CPU (``auto_cast`` is a
no-op there), so on CPU an enabled ``amp`` warns once and the run stays in float32. SwAV's
Sinkhorn and cross-entropies (log-softmax) run in float64 regardless: the loss casts the
scores up and returns a float32 scalar (see ``passl/models/losses/swav.py`` for why).
"""
import contextlib

import numpy as np
import paddle

from passl.errors import ConfigError
from passl.registry import check_keys
from passl.utils.logger import get_logger

DTYPES = ("float16", "bfloat16")
KEYS = ("enable", "dtype", "level")


class MixedPrecision:
    """Forward under autocast, backward and step through the scaler when there is one."""

    def __init__(self, cfg, device):
        cfg = dict(cfg or {})
        check_keys(cfg, KEYS, "amp")
        self.enabled = bool(cfg.get("enable", False))
        self.dtype = cfg.get("dtype", "float16")
        self.level = cfg.get("level", "O1")
        if self.dtype not in DTYPES:
            raise ConfigError(f"amp.dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.level != "O1":
            raise ConfigError(f"amp.level: only O1 is supported (O2 keeps float16 parameters "
                              f"without float32 master weights), got {self.level!r}")
        if self.enabled and device == "cpu":
            get_logger().warning("amp.enable: Paddle has no mixed-precision kernels on CPU; "
                                 "training in float32 (set amp.enable=false to silence this)")
            self.enabled = False
        self.fallback = self._supported_dtype() if self.enabled else None
        use_scaler = self.enabled and self.dtype == "float16"
        self.scaler = paddle.amp.GradScaler() if use_scaler else None
        if self.fallback:
            get_logger().warning(f"amp: {self.describe()}")
        self._scale_as_scalar()
        self.last_step_skipped = False  # the scaler found inf/NaN gradients and skipped
        self.consecutive_skipped = 0    # HealthHook stops the run after too many in a row

    def _supported_dtype(self):
        """Fall back, with a warning, when this GPU lacks the dtype (``auto_cast`` would only
        warn and run float32 ops while the log claimed bfloat16). Returns the reason or None."""
        requested, reason = self.dtype, None
        if self.dtype == "bfloat16" and not paddle.amp.is_bfloat16_supported():
            reason = "this GPU has no bfloat16 (compute capability 8.0+, e.g. A100, needed)"
            self.dtype = "float16"
        if self.dtype == "float16" and not paddle.amp.is_float16_supported():
            reason = "this GPU has no float16 kernels"
            self.enabled = False
        return f"amp.dtype {requested} asked for, but {reason}" if reason else None

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, dtype=self.dtype, level=self.level)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer):
        """Optimizer step; with a scaler the gradients are unscaled first and a step with
        inf/NaN gradients is skipped (and the loss scale lowered)."""
        if self.scaler:
            self.scaler.step(optimizer)
            # a Python bool here: Paddle's optimizer has already read found_inf on the host
            self.last_step_skipped = bool(getattr(self.scaler, "_cache_found_inf", False))
            self.consecutive_skipped = self.consecutive_skipped + 1 if self.last_step_skipped \
                else 0
            self.scaler.update()
        else:
            optimizer.step()

    def describe(self):
        if not self.enabled:
            text = "off (float32)"
        else:
            text = f"{self.dtype} {self.level}" + (" with loss scaling" if self.scaler else "")
        return text + (f" ({self.fallback})" if self.fallback else "")

    def state_dict(self):
        """The scaler's state in the form Paddle's ``GradScaler.load_state_dict`` reads back:
        the scale as a shape-[1] array (it reads ``state["scale"][0]``), although this class
        keeps it 0-d while training (:meth:`_scale_as_scalar`)."""
        if not self.scaler:
            return {}
        state = self.scaler.state_dict()
        state["scale"] = scale_as_array(state["scale"])
        return state

    def set_state_dict(self, state):
        """Resume the scaler; also accepts the 0-d scale that checkpoints of earlier versions
        of this class hold."""
        if self.scaler and state:
            self.scaler.load_state_dict({**state, "scale": scale_as_array(state["scale"])})
            self._scale_as_scalar()

    def _scale_as_scalar(self):
        """Paddle 3.3's GradScaler keeps its loss scale as a shape-[1] tensor and, when it lowers
        the scale, prints ``float(scale)``, which NumPy 2.4 refuses for a 1-element array: the
        first overflow would end the run with a TypeError. A 0-d scale behaves the same."""
        if self.scaler is not None and getattr(self.scaler, "_scale", None) is not None:
            self.scaler._scale = self.scaler._scale.reshape([])


def scale_as_array(scale):
    """A saved loss scale (0-d or shape [1], array or tensor) as the shape-[1] float32 array
    Paddle saves and loads."""
    return np.asarray(scale, dtype="float32").reshape([1])
