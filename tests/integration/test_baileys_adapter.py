"""The Baileys adapter's own tests (node --test) against the real @whiskeysockets/baileys and a real sidecar.

npm ci installs the pinned packages (integrations/baileys/package-lock.json) when they are missing; the node
tests start `python -m sidecar serve` with this interpreter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.monitoring import run_tool

ADAPTER = Path(__file__).resolve().parents[2] / "integrations" / "baileys"


async def _run(*argv: str, deadline: float) -> tuple[int, str]:
    env = {**os.environ, "WA_SIDECAR_PYTHON": sys.executable}
    return await run_tool(*argv, cwd=ADAPTER, env=env, deadline=deadline)


async def test_the_adapter_passes_its_node_tests_against_real_baileys() -> None:
    if not (ADAPTER / "node_modules" / "@whiskeysockets" / "baileys").exists():
        code, output = await _run("npm", "ci", "--no-audit", "--no-fund", deadline=600)
        assert code == 0, output
    code, output = await _run("node", "--test", "--test-reporter=tap", deadline=300)
    assert code == 0, output[-6000:]
    assert "# fail 0" in output and "# pass 0" not in output, output[-3000:]
