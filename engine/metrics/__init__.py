"""Prometheus objects, one module per kind of process: `daemon` (the supervisor, its
workers and their status consumers), `bff` (the HTTP gate) and `resource_domain`.

A process imports only its own module, so its registry holds only its own metrics.
"""
