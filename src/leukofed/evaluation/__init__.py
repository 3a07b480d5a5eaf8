"""Evaluation of trained models: metrics, calibration, statistics, explanations and audits."""
