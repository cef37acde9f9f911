"""The one exception type the library raises for bad input.

Every message is a single line that names the problem, so the command line can print it
as it is and exit with status 2, and a notebook user sees the cause without a traceback to read.
"""


class PaliGemmaError(ValueError):
    """Bad input: a missing file, a corrupt checkpoint, an impossible setting."""
