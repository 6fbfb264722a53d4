"""The one base class of the errors a user can act on (bad input, missing files, unusable state).

Each module raises its own subclass with a message that names the file, key or request; the CLI
prints that message on one line and exits with status 2, so nothing here may import more than
the standard library.
"""


class CxrError(Exception):
    """An error whose message tells the user what to change."""
