"""Presenting results: rich tables, the Pareto plot, JSON."""
