"""Exception types. Every message names the problem *and* the fix, because the CLI and the Slicer
module show it to the user verbatim."""

from __future__ import annotations


class SRCSMError(Exception):
    """Base class of all errors this library raises on purpose (the CLI maps it to exit code 2)."""


class InputError(SRCSMError):
    """The input image or file cannot be used (missing, unreadable, wrong dimension, non-finite...)."""


class ModelPackageError(SRCSMError):
    """A model package is missing, malformed, tampered with, or does not fit the request."""


class CancelledError(SRCSMError):
    """The user cancelled a running job."""
