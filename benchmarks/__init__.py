"""Benchmarks of issue 2 (slot lookup, routed insert overhead, shard balance) and
issue 3 (relay publish rate against raw nats-py and FastStream, events end to end).

Run a set with `python -m benchmarks [issue2|issue3]` (add `--quick` for a smoke
run), or one benchmark with `python -m benchmarks.<module>`, e.g.
`benchmarks.slot_lookup`, `.insert_routing`, `.balance`, `.relay_publish`, `.events_e2e`.
"""
