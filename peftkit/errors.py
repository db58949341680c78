"""The one user-facing exception type.

Every error a user can cause (bad flag, missing file, adapter that does not fit the model) is raised as
`PeftkitError` with a message that says what is wrong and what would be right. The CLI prints it as
`error: <message>` and exits 2, without a traceback (`--debug` shows it).
"""


class PeftkitError(ValueError):
    """A problem with the user's input or files; the message is shown to the user as is."""
