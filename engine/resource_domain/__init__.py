"""The reference Resource Domain (`seckill resource-domain`): provisions instances from
INSTANCE_CREATED events and reports their status.

It stands for a service another team runs, so it uses only the shared contracts
(the events, `engine.amqp`, the settings), never the engine's pipeline.
"""
