"""One batch's stages, in the order the conductor runs them:

reader -> orders -> catalog -> ids -> logsink -> events -> publisher (framing) -> settle,
with the janitor reclaiming what a dead consumer left pending. `conductor` runs a batch
through them; each stage is a module with inputs and outputs testable on its own.
"""
