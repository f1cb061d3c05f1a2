"""The daemon's face to its operators: Prometheus metrics and the health endpoints."""
