"""Triptych's UNet stage service."""
