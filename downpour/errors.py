"""User-facing errors and their exit codes (see the contract: 2 config, 3 data, 1 anything else)."""

from __future__ import annotations


class DownpourError(Exception):
    """Base class of errors shown to users as one line, without a traceback."""

    exit_code = 1


class ConfigError(DownpourError):
    """Bad command line or configuration; the message names the key path."""

    exit_code = 2


class DataContractError(DownpourError):
    """The data breaks its declared contract; the message names the column and the file."""

    exit_code = 3


class GateRefused(DownpourError):
    """The quality gate refused to promote a model (exit code 4, so schedulers can tell it apart)."""

    exit_code = 4
