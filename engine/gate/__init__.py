"""The purchase gate: the Lua scripts' client (`redis_gate`, with the two ways a busy
server's calls are coalesced: `pipe` on a single Redis, `routed` per master) and the
HTTP app that serves it (`app`, the BFF). Its Prometheus objects live in
`engine.metrics.bff`.
"""
