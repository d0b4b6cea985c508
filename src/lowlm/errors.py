"""The one exception the CLI turns into a readable message instead of a traceback."""


class LowlmError(Exception):
    """Bad input or state: the message says what is wrong and what to do."""
