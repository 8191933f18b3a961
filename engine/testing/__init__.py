"""The test harness: what the tests, the benchmark, the chaos suite and the load test
share to run the engine from the outside (as asyncpg's `cluster.py` and `_testbase`).

One module per piece, each imported by name: `ports` and `waits`; `processes` (a
`seckill` child) and `bff` (the HTTP gate as one); `nodes` and `clusters` (private
Redis, RabbitMQ and PostgreSQL servers); `faultproxy` (a TCP proxy that injects
network faults); `taps` (a queue that keeps every event the engine published); and
`invariants`, the one checker of a sale's outcome that the load-test verifier, the
fault scoreboard and the tests all use.

Nothing else in `engine` imports this package: the engine does not depend on its
harness (tests/test_layout.py).
"""
