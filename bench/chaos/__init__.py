"""The chaos suite's tools: a fault proxy to put between the engine and a service."""
