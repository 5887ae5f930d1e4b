"""Benchmarks of issue 2: slot lookup speed, routed insert overhead, shard balance.

Run all three with `python -m benchmarks` (add `--quick` for a smoke run), or one
with `python -m benchmarks.slot_lookup`, `.insert_routing` or `.balance`.
"""
