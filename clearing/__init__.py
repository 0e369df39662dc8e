"""Clearing service: verify, dedupe, store, settle (issue 5)."""
