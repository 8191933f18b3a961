"""One batch's stages, in the order `batches.Pipeline` runs them:

read (reader: redisreader or clusterreader, picked by autoreader) -> decode (orders)
-> look up (catalog) -> IDs (ids) -> log (orderrows) -> publish (events, publisher)
-> acknowledge (settle), with the janitor reclaiming what a dead consumer left pending
and `redelivery` keeping the books of what is delivered again (errors, delivery counts,
poison). Each stage is a module with inputs and outputs testable on its own.
"""
