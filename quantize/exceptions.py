"""Errors raised on purpose by the :mod:`quantize` package.

    AdacodeError
    └── QuantizeError                training, evaluation and the table model
        ├── CodebookError            quantize.codebook
        ├── LengthPolicyError        quantize.lengths
        └── AssignmentError          quantize.assign

A public entry point raises one class for its bad inputs: an error of a lower module it
calls is re-raised as its own class, the cause chained (``CodeAssigner.add`` raises
:class:`AssignmentError` for bad paths or popularity that :mod:`quantize.lengths`
rejected). Messages name the resource, the cause and the fix.
"""

from adacode.errors import AdacodeError


class QuantizeError(AdacodeError):
    """Base class of all errors raised by :mod:`quantize`."""


class CodebookError(QuantizeError):
    """A residual codebook cannot be trained, used or (de)serialized as asked."""


class LengthPolicyError(QuantizeError):
    """A length policy is unknown or was given invalid inputs or parameters."""


class AssignmentError(QuantizeError):
    """Served-code assignment was given bad keys, paths, popularity, codes or state."""
