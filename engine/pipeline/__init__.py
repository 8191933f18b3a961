"""One batch's stages, in the order `batches.Pipeline` runs them:

reader -> orders -> catalog -> ids -> orderrows -> events -> publisher (framing) -> settle,
with the janitor reclaiming what a dead consumer left pending. `batches` runs a batch
through them; each stage is a module with inputs and outputs testable on its own.
"""
