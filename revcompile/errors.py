"""The one exception type users catch: what was wrong and what to do about it."""


class RevcompileError(ValueError):
    """Raised for bad input or a model that cannot be made reversible; the message says what to do."""
