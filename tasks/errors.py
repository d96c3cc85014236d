"""The one exception type for user errors (exit code 2 in the CLI)."""


class InputError(ValueError):
    """Bad input from the user: a spec, a data file, a family name, a parameter value.

    The message is one line that names the problem and, where there is a finite set of valid
    choices, lists them.
    """
