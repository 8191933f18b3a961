"""Operator commands: sale figures, stream trimming, dead letters, migrations and the
development stack. They sit above the rest and nothing in the engine imports them.
"""
