"""The message bus shared by the engine and the Resource Domain: its names, the frames
and confirm publisher that write to it, and the batching consumer that reads it.

The reference Resource Domain stands for an outside service, so it may use this
package and the event contract but never the engine's pipeline.
"""
