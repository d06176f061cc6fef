"""What crosses a boundary between Triptych's services: wire codec, protocol models, settings, errors."""

__version__ = "0.1.0"
