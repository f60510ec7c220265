"""The one error type users see: a one-line message naming the file and the problem."""


class PertaError(Exception):
    """Bad input or a refused operation. The CLI prints `error: <message>` and exits 2."""
