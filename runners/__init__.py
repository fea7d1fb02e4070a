"""Protocols and table runners: training, tables, figures and benchmarks."""
