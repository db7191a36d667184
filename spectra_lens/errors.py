"""The one exception type for user errors."""

__all__ = ["SpectraError"]


class SpectraError(ValueError):
    """Bad input from the user: the message says what was expected and what was given."""
