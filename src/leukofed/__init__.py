"""leukofed: federated learning for B-ALL blood-smear classification."""

__version__ = "0.1.0"
