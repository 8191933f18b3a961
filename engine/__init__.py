"""seckill engine: a flash-sale pipeline from a Redis Lua gate to provisioned instances."""

__version__ = "0.1.0"
