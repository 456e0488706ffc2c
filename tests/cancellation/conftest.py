"""Fixtures of the cancellation tests, which share the data-path rig.

The rig lives in ``tests/datapath/vhost_dp_harness.py``; test directories are not packages,
so its directory is put on ``sys.path`` here, once, for every module below this one.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import trio_vhost.server
from trio_vhost.session import Session

_DATAPATH = str(Path(__file__).resolve().parent.parent / "datapath")
if _DATAPATH not in sys.path:
    sys.path.insert(0, _DATAPATH)


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[Session]:
    """Every Session the server creates, to learn which fds it holds."""
    made: list[Session] = []

    class RecordingSession(Session):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(trio_vhost.server, "Session", RecordingSession)
    return made


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
