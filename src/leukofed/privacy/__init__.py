"""Privacy: DP-SGD with per-site (epsilon, delta) accounting, and the membership-inference audit."""
