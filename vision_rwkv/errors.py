"""The one exception type for user errors (bad paths, configs, checkpoints, inputs).

Entry scripts print its message (one line) and exit with status 2. Bugs stay ordinary tracebacks.
"""


class VisionRWKVError(Exception):
    """A user error: the message says what was wrong and what was expected, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
