"""Triptych's VAE decoder stage service."""
