"""Errors that the CLI turns into a one-paragraph message and a non-zero exit."""


class PipelineError(Exception):
    """Bad input or a state the user can fix; the message says what and how."""
