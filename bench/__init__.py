"""kvstore's benchmarks: `python -m bench run SUITE` measures kvstore beside its limits and peers in one run.

See docs/benchmarks.md for the suites, the figures and the commands that made them.
"""
