"""Data stages: acquire, synthesise, validate, cache, split and partition the blood-smear images."""
