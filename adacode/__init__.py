"""adacode: adaptive-length residual codes for per-domain embedding tables, fed by Kafka.

The ``adacode`` package holds only what every other package shares (the root error);
the service lives in ``worker`` (I/O and daemon), ``quantize`` (pure array logic)
and ``store`` (state partitions).
"""

from adacode.errors import AdacodeError

__all__ = ["AdacodeError"]
__version__ = "0.1.0"
