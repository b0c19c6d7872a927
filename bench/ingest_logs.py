"""Lines/s of `wa-sidecar ingest-logs` on a realistic Baileys backend log, side by side with Debian's mtail
counting the same Bad MAC lines per session from the same file, in one run.

    python -m bench.ingest_logs [--lines 1000000] [--sessions 1000] [--runs 3]

The log: the real Baileys 7.0.0-rc14 debug log lines (tests/fixtures/baileys) as templates, each written by
one of N sessions' child loggers (organizationId, organizationPhoneId, phoneJid bindings), with decrypt failures
injected every ~200 lines: a pkmsg Bad MAC (one pino record), a msg-path Bad MAC (libsignal's console block,
then Baileys' `No matching sessions` record), or a redelivered duplicate (a `Key used already` block, then the
same record). Reconnects (`opened connection to WA`) now and then.
- ingest-logs: the real CLI on the embedded store (it reads, classifies and applies every event: heals, closes);
  its own summary gives lines/s from first line to the last event applied, and the wall time of the process.
- mtail: `-one_shot` with a program counting `failed to decrypt message` records whose error is Bad MAC or
  `No matching sessions…` per organizationPhoneId (what a regex can do); wall time of the process.
Medians over the runs. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

FIXTURES = Path(__file__).parent.parent / "tests" / "fixtures" / "baileys"
MTAIL = shutil.which("mtail") or "/usr/bin/mtail"
MTAIL_PROGRAM = r"""
counter wa_bad_mac_lines by organization_phone_id
/"organizationPhoneId":(?P<phone>\d+),.*"message":"(Bad MAC|No matching sessions found for message)"/ +
/.*"msg":"failed to decrypt message"/ {
  wa_bad_mac_lines[$phone]++
}
"""
STACK = "\n    at SessionCipher.doDecryptWhisperMessage (/srv/backend/node_modules/libsignal/src/session_cipher.js:250)"


def generate(path: Path, lines: int, sessions: int, seed: int = 7) -> dict[str, int]:
    """Writes the log; returns the ground truth (real Bad MACs, duplicates, Bad-MAC-looking records)."""
    rng = random.Random(seed)
    # The sample session reconnects four times in two minutes; its connection lines are left out of the
    # templates, and reconnects are injected at a realistic rate below instead.
    connection_lines = ("opened connection to WA", "connection errored")
    templates = [
        record
        for record in map(json.loads, (FIXTURES / "session.baileys.pino.jsonl").read_text().splitlines())
        if record.get("level", 0) < 50 and record.get("msg") not in connection_lines
    ]
    truth = {"bad_mac": 0, "duplicates": 0, "bad_mac_looking_records": 0}
    written = 0
    with path.open("w") as out:
        while written < lines:
            phone = rng.randrange(1, sessions + 1)
            head = {"level": 30, "time": 1795578749000 + written, "pid": 4242, "hostname": "backend-1",
                    "organizationId": 1 + phone % 50, "organizationPhoneId": phone,
                    "phoneJid": f"7900{phone:07d}@s.whatsapp.net", "class": "baileys"}  # fmt: skip
            roll = rng.random()
            if roll < 0.005:
                kind = rng.choices(("pkmsg", "msg", "duplicate"), (6, 3, 1))[0]
                if kind != "pkmsg":
                    duplicate = "MessageCounterError: Key used already or never filled"
                    cause = "Error: Bad MAC" if kind == "msg" else duplicate
                    out.write("Failed to decrypt message with any known session...\n")
                    out.write(f"Session error:{cause} {cause}{STACK}\n")
                    written += 3
                error = "Bad MAC" if kind == "pkmsg" else "No matching sessions found for message"
                record = head | {
                    "level": 50,
                    "key": {"remoteJid": "15550002222@s.whatsapp.net", "fromMe": False, "id": f"3EB0{written:016X}"},
                    "err": {"type": "Error", "message": error, "stack": f"Error: {error}{STACK}"},
                    "messageType": "pkmsg" if kind == "pkmsg" else "msg",
                    "msg": "failed to decrypt message",
                }
                truth["bad_mac_looking_records"] += 1
                truth["bad_mac" if kind != "duplicate" else "duplicates"] += 1
            elif roll < 0.006:
                record = head | {"msg": "opened connection to WA"}
            else:
                template = templates[written % len(templates)]
                record = head | {k: v for k, v in template.items() if k not in ("level", "time", "pid", "hostname")}
                record["level"] = template.get("level", 30)
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
            written += 1
    truth["lines"] = written
    return truth


async def run_ingest(path: Path) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "ingest-logs", str(path), "--listen", "127.0.0.1:0", "--log-level", "ERROR",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    output, _ = await process.communicate()
    wall = time.perf_counter() - started
    summary = next(json.loads(line)["ingest"] for line in output.splitlines() if line.startswith(b'{"ingest"'))
    return wall, summary


async def run_mtail(path: Path, programs: Path) -> tuple[float, int]:
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        MTAIL, "-one_shot", "-one_shot_format", "prometheus", "-progs", str(programs), "-logs", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, errors = await process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"mtail failed: {errors.decode()[-2000:]}")
    values = [line.rsplit(" ", 1)[1] for line in output.decode().splitlines() if line.startswith("wa_bad_mac_lines{")]
    return wall, sum(int(float(value)) for value in values)


async def run(lines: int, sessions: int, runs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="wa-bench-ingest-"))
    try:
        log = work / "backend.log"
        truth = generate(log, lines, sessions)
        (work / "progs").mkdir()
        (work / "progs" / "baileys.mtail").write_text(MTAIL_PROGRAM)
        size_mb = log.stat().st_size / 1e6
        ingest_walls, ingest_rates, mtail_walls = [], [], []
        summary: dict[str, object] = {}
        mtail_count = 0
        for _ in range(runs):
            wall, summary = await run_ingest(log)
            ingest_walls.append(wall)
            ingest_rates.append(float(summary["linesPerSecond"]))  # type: ignore[arg-type]
            wall, mtail_count = await run_mtail(log, work / "progs")
            mtail_walls.append(wall)
        total = truth["lines"]
        ingest_wall, mtail_wall = statistics.median(ingest_walls), statistics.median(mtail_walls)
        print(f"ingest bench: {total:,} lines ({size_mb:.0f} MB), {sessions} sessions, {runs} runs each, medians")
        print(f"  ingest-logs: {statistics.median(ingest_rates):,.0f} lines/s reading+applying; process wall "
              f"{ingest_wall:.2f} s = {total / ingest_wall:,.0f} lines/s (includes Python start-up)")  # fmt: skip
        print(f"  mtail:       process wall {mtail_wall:.2f} s = {total / mtail_wall:,.0f} lines/s")
        print(f"  ratio (ingest-logs / mtail, wall): {mtail_wall / ingest_wall:.2f}x")
        classes = summary.get("decryptErrors")
        assert isinstance(classes, dict)
        print(f"  ground truth: {truth['bad_mac']} real Bad MACs, {truth['duplicates']} redelivered duplicates, "
              f"{truth['bad_mac_looking_records']} records that look like Bad MAC")  # fmt: skip
        print(f"  counted: ingest-logs bad_mac {classes.get('bad_mac', 0)} (counter {classes.get('counter', 0)}); "
              f"mtail {mtail_count}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.lines, args.sessions, args.runs))


if __name__ == "__main__":
    main()
