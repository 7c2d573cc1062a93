"""Benchmarks: each module measures one speed or size goal and records its table in results/."""
