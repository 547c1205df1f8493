"""Every limit of circuits_core.limits is enforced: each one was seen refusing or clamping an
over-limit request in a drill of this session (the drills append to ``ENFORCED_LIMITS``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from circuits_core.limits import Limits
from drill_support import ENFORCED_LIMITS, LIMIT_DRILL_MODULES, record_drill


def test_zz_every_limit_is_enforced(request) -> None:
    ran = {Path(str(item.fspath)).name for item in request.session.items}
    names = [f.name for f in dataclasses.fields(Limits)]
    missing = [n for n in names if not any(e == n or e.startswith(n + " ") for e in ENFORCED_LIMITS)]
    if not set(LIMIT_DRILL_MODULES) <= ran:
        if ENFORCED_LIMITS:
            record_drill("limits: over-limit requests refused", requests=len(ENFORCED_LIMITS), errors=0,
                         note=f"partial run: {len(names) - len(missing)}/{len(names)} limits drilled")  # fmt: skip
        pytest.skip("not every limit drill ran in this session")
    record_drill("limits: over-limit requests refused", requests=len(ENFORCED_LIMITS), errors=len(missing),
                 note=f"{len(names) - len(missing)}/{len(names)} limits drilled" + (f"; missing {', '.join(missing)}"[:60] if missing else ""))  # fmt: skip
    assert missing == [], f"limits with no drill: {missing}"
