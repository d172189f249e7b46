"""The root of every error adacode raises on purpose.

Each package has a small ``exceptions.py`` whose classes derive from
:class:`AdacodeError`. Messages name the resource, the cause and the fix, and
wrap lower-level errors with ``raise ... from exc``.
"""


class AdacodeError(Exception):
    """Base class of all adacode errors; catch this to catch them all."""
