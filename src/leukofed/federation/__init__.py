"""Federated learning: aggregation (pure functions on state dicts) and the in-process round engine."""
