"""Exceptions shared across the package."""

from __future__ import annotations


class MissingPackageError(ImportError, ValueError):
    """An optional package that a feature needs is not installed; the message names it and the extra
    (``pip install 'vital_fast[demo]'``) that installs it.

    An ``ImportError``, and a ``ValueError`` too: bad input that the CLI reports in one line with
    exit code 2.
    """
