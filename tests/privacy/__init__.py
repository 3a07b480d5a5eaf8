"""Tests of leukofed.privacy."""
