"""Test support: synthetic openpi checkpoints for the test suite, benchmarks and the built-in example.

Nothing in the merge path imports this package; the built-in example imports it lazily, when asked for.
"""
