"""Significance (docs/significance.md): bootstrap intervals beside the stored scores, and permutation
p-values and q-values for each unit's best labels and for each embedding's gain over its best filter.

resample.py draws the bootstrap weights and turns replicates into intervals and q-values; null.py is
the permutation null (its kernel in kernel.py); stage.py reads a probe, runs both and writes a run.
"""
