"""The one exception type for mistakes a user can make (bad path, bad file, bad flag).

Command-line entry points catch :class:`UserError` and print its message without a
traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names what, where, and the fix."""
