"""Errors raised on purpose by the :mod:`quantize` package.

Every class derives from :class:`adacode.errors.AdacodeError`. Messages name the
resource, the cause and the fix.
"""

from adacode.errors import AdacodeError


class QuantizeError(AdacodeError):
    """Base class of all errors raised by :mod:`quantize`."""


class CodebookError(QuantizeError):
    """A residual codebook cannot be trained, used or (de)serialized as asked."""


class LengthPolicyError(QuantizeError):
    """A length policy is unknown or was given invalid inputs or parameters."""


class AssignmentError(QuantizeError):
    """The code assigner was given inconsistent keys, paths or state."""
