"""The base class of errors a user can cause (bad path, config, request or data file).

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback. Each subsystem subclasses it (ConfigError, CheckpointError, TokenizerError, ...).
"""


class EmberError(ValueError):
    """A problem with the user's input; the message names it and, where possible, the fix."""
