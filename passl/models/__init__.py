"""Model parts; importing this package registers all of them."""
from passl.models.registry import BACKBONES, HEADS, LOSSES, MODELS, NECKS  # noqa: F401
from passl.models import backbones, necks, heads, losses, architectures  # noqa: F401,E402
from passl.models import passl_v1  # noqa: F401,E402  (lets passl/io read PASSL v1 files)
