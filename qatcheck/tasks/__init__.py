"""Tasks: metrics and task-level parity (classification top-k, detection mAP)."""
