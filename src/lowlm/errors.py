"""The one exception the CLI turns into a readable message instead of a traceback."""


class LowlmError(Exception):
    """Bad input or state: the message says what is wrong and what to do."""


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) in a stage; the message says where it stopped and how it goes on."""
