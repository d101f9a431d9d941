"""Benchmarks of oloraplus against the paper's stack: the harness behind `oloraplus bench`, its probes and results."""
