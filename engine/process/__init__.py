"""The pre-fork process model: the daemon, its supervisor, the workers it forks, and the
health endpoint and systemd notifications the supervisor serves.

Imports run downward only: the process layer drives the pipeline and the status
consumer, and nothing below it imports from here.
"""
