"""The error of a run whose numbers stopped being finite, in a module that imports nothing, so
that the CLI can catch it without loading torch or transformers."""


class DivergedError(RuntimeError):
    """Training diverged: updates with a non-finite loss or gradient (`NonFiniteError`), or a
    policy whose logits are NaN or inf (`NonFiniteLogitsError`). The CLI prints it as one line
    (exit code 1)."""
