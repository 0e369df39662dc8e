"""Terminals: readers, transaction flows over a reader and a PSAM (more arrives with issue 4)."""
