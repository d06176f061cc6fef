"""Triptych's central service: the public REST API that chains the three stages."""
