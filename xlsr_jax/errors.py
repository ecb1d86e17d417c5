"""Errors a user can fix. The CLI prints their message (which names the file, key or folder) and
exits with status 2 instead of showing a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a missing file, an inconsistent folder, an option that cannot apply."""
