"""Triptych's text encoder stage service."""
