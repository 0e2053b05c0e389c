"""The one exception type users catch: what was wrong and what to do about it."""


def describe(err: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message` of an exception, the line cut at `limit` characters: for reasons and logs.

    Example:
        >>> describe(ValueError("bad shape\nmore"))
        'ValueError: bad shape'
    """
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:limit]}"


class RevcompileError(ValueError):
    """Raised for bad input or a model that cannot be made reversible; the message says what to do."""
