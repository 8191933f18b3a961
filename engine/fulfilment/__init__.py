"""The engine's side of the closed loop: the status consumer that settles the Resource
Domain's reports into `seckill_logs` and hands failed orders' units back to their sale.
"""
