"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, mismatched tokenizer, ...)."""


class ConfigError(UserError, ValueError):
    """The configuration is invalid."""
