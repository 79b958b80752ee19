"""Evaluation: k-NN, linear probe, retrieval."""
