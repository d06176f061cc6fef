"""The contract between Triptych's services: what crosses a boundary.

``wire`` (the msgpack tensor codec), ``protocol`` (the message models), ``operations`` (each stage operation
declared once), ``errors`` (one envelope), ``settings``, ``schedulers`` (the scheduler catalogue) and
``tracing`` (request IDs and trace context). Nothing here knows a server: the stage server framework is the
``shared.serving`` subpackage, on top of this one (``tests/test_architecture.py`` keeps it that way).
"""

__version__ = "0.1.0"
