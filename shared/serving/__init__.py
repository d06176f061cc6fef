"""The stage server framework: what every Triptych service process shares, on top of the contract in ``shared``.

Dependencies run one way: ``shared`` (wire, protocol, operations, errors, settings, tracing) knows nothing of
this package; this package knows no stage and not central; stages and central build on both.

==================  =============================================================================
``runtime``         ``StageRuntime``: owns a stage's torch modules, one batcher per operation
``batching``        the model thread (``ModelWorker``), ``Batcher``, ``MicroBatcher``, ``Work``
``app``             ``build_stage_app``: a msgpack route per operation, health, readiness, info
``http``            bounded bodies, msgpack replies, abandoning work when the caller hangs up
``middleware``      request IDs and trace context, access log, HTTP metrics, drain refusals
``metrics``         the Prometheus registry of one app
``logs``            JSON or human log lines
``server``          uvicorn with a graceful drain (``Lifecycle``, ``serve``)
``launcher``        flags and environment to settings, logging, allocator, serve: a process's start
``models``          model directories: loading one component, fingerprints, the tiny random models
==================  =============================================================================
"""
