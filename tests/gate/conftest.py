"""The gate's tests: the BFF runs without authentication unless a test gives it keys
(tests/gate/test_auth.py does), so the older tests keep naming the buyer in the body."""

from __future__ import annotations

import pytest

from engine.config import Settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(bff_auth="none")
