"""User-facing errors: the CLI prints them in one line and exits with status 2, without a traceback."""


class MessError(Exception):
    """A problem with the user's input (a file, a field, a value) that names what is wrong and what is allowed."""


class SpaceError(MessError):
    """A search-space file that does not validate."""


class DataError(MessError):
    """A data set that is missing, malformed or does not match the space."""
