"""The one exception type that carries a message meant for the user."""


class UserError(Exception):
    """A problem with the user's input (path, option, data) that deserves a one-line message.

    Library code raises it; the command-line layer prints ``str(error)`` and exits non-zero
    without a traceback. Anything else escaping the library is a bug and keeps its traceback.
    """
