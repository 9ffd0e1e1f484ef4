"""incseg benchmarks: ``python -m benchmarks [NAME ...] [--json FILE]`` (see docs/benchmarks.md)."""
