"""Observability: Prometheus metrics (and, with later issues, tracing and logging setup)."""
