"""The purchase gate: the Lua script's client (`client`) and the HTTP app that serves it
(`app`, the BFF). Its Prometheus objects live in `engine.metrics.bff`.
"""
