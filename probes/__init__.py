"""Reusable probing math on activations: linear probes, directions, metrics.

Takes arrays or tensors and labels; knows nothing about how activations were obtained (it never
imports :mod:`interp`).
"""
