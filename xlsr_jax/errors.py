"""Errors a user can fix. The CLI prints their message (which names the file, key or folder) and
exits with status 2 instead of showing a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a missing file, an inconsistent folder, an option that cannot apply."""


class DataError(UserError, ValueError):
    """Bad data input: a source spec, a table, an archive, a dataset's columns; the message names it.
    A ValueError too, as these were before."""
