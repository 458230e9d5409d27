"""Explicit-state models of scrub-listener's protocols (test code)."""
