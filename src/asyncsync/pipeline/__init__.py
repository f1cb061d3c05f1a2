"""The pipeline stages (scan, manifest, plan, transfer) and the one place that opens
them (`session.Pipeline`)."""
