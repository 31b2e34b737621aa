"""The one exception type that carries a user-facing, one-line message."""


class DfqError(Exception):
    """Bad input or an impossible request. The CLI prints str(e) on one line and exits 1."""
