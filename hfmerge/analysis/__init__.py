"""Measurements over models: CKA, unit matching, interpolation and the loss barrier, evaluation,
and the JSON and plot outputs of those reports."""
