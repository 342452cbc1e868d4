"""One exception type for every problem a user can cause: the CLI prints its message on one line."""


class BirdboneError(Exception):
    """A user-facing error: bad input, unsupported model, invalid recipe. Message names the culprit."""
