"""Benchmarks that print figures (time, memory), run as `python -m kd_plugin.benchmarks.<name>`."""
