"""Audit: chip findings and reconciliation (issue 6)."""
