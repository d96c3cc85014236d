"""Data: samples read from files or simulated, checked against a family."""
