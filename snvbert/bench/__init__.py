"""Benchmarks: each module has ``run(out_dir) -> dict`` and writes ``out_dir/<name>.json``."""
