"""The exception for user errors (exit code 2 in the CLI) and the warning for fits that did not
converge."""


class InputError(ValueError):
    """Bad input from the user: a spec, a data file, a family name, a parameter value.

    The message is one line that names the problem and, where there is a finite set of valid
    choices, lists them.
    """


class ConvergenceWarning(UserWarning):
    """A fit stopped before it converged (step budget, a bound, a divergence): its result says so
    too (`converged`, `outcome`, `reason`), as scikit-learn's estimators do."""
