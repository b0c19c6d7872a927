"""`whatsapp_runtime_sessions{library,version}` and `whatsapp_runtime_advisory_sessions{advisory}`: the sessions
by the runtime version they run (each connection's `runtime.info`), and those on a version a known advisory names
(sidecar/rules/advisories.json). A collector in prometheus_client's way: read at scrape time from the link, so a
session that goes (its connection closed, its phone forgotten) is not counted by construction."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.rules.versions import advisories_for, known_advisories

RuntimeSessions = Callable[[], Mapping[tuple[str, str], int]]
SESSIONS = (
    "whatsapp_runtime_sessions",
    "Sessions by the WhatsApp library and version their runtime runs (runtime.info)",
    ("library", "version"),
)
ON_ADVISORY = (
    "whatsapp_runtime_advisory_sessions",
    "Sessions on a library version named in a known advisory (sidecar/rules/advisories.json)",
    ("advisory",),
)
FAMILIES = (SESSIONS, ON_ADVISORY)


class RuntimeVersions(Collector):
    def __init__(self) -> None:
        self._sessions: RuntimeSessions = dict

    def bind(self, sessions: RuntimeSessions) -> None:
        """`sessions()`: live sessions per (library, version) of the connections that said which they run."""
        self._sessions = sessions

    def collect(self) -> Iterable[Metric]:
        sessions, advisory = (GaugeMetricFamily(name, text, labels=list(labels)) for name, text, labels in FAMILIES)
        on_advisory: Counter[str] = Counter()
        for (library, version), count in sorted(self._sessions().items()):
            sessions.add_metric([library, version], count)
            for advisory_id in advisories_for(library, version):
                on_advisory[advisory_id] += count
        for known in known_advisories():  # every advisory has a series (0 when no session is on it)
            advisory.add_metric([known.advisory_id], on_advisory[known.advisory_id])
        return [sessions, advisory]
