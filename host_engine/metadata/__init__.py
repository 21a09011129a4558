"""The engine's edge towards the metadata servers, one module per job.

- :mod:`~host_engine.metadata.client`: the admin HTTP API client (token, TLS, retries, request observer).
- :mod:`~host_engine.metadata.reconcile`: brings each server's pending events in line with the store.
- :mod:`~host_engine.metadata.notices`: sends the notices that are due, each worker claiming its share.
- :mod:`~host_engine.metadata.acks`: reads the guests' acknowledgements back from the servers.
- :mod:`~host_engine.metadata.election`: elects the one worker that does the fleet's chores.
- :mod:`~host_engine.metadata.probe`: asks idle servers for ``/healthz`` so the ``up`` gauge stays current.
"""
