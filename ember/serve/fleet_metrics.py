"""Fleet metrics: each engine replica's Prometheus metrics with a `replica` label, and one merged view.

    server = ReplicaMetricsServer(serving.metrics.registry, replica="ember-replica#a1b2", host=ip, port=0)
    server.url                                    # http://10.0.0.5:41235/metrics, for Prometheus to scrape
    text = merge_expositions({"r1": text1, "r2": text2})   # one valid exposition from several replicas
    http_sd_targets(targets)                      # the Prometheus http_sd_config answer listing them

Under Ray Serve (ray.py) every replica runs its own engine and its own ServerMetrics registry.
Each replica serves that registry on a port of its own, every sample labelled with the replica's
id, from prometheus_client's HTTP server thread (it answers while the engine is busy). Prometheus
finds the replicas through the front's `/fleet/targets` (http_sd_configs; deploy/prometheus), and
the front's own `/metrics` is the merge of all of them for setups without service discovery: one
HELP/TYPE per family and every replica's samples under it, which Prometheus accepts as one target
(concatenating the texts would repeat the TYPE lines, which it rejects).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"


class ReplicaLabelled:
    """A collector that yields another registry's metrics with `replica="<id>"` on every sample."""

    def __init__(self, registry: CollectorRegistry, replica: str) -> None:
        self.registry = registry
        self.replica = replica

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            yield _relabelled(family, {REPLICA_LABEL: self.replica})


def _relabelled(family: Metric, extra: Mapping[str, str]) -> Metric:
    out = Metric(family.name, family.documentation, family.type, family.unit)
    out.samples = [s._replace(labels={**s.labels, **extra}) for s in family.samples]
    return out


class ReplicaMetricsServer:
    """The replica-labelled metrics of one replica on their own HTTP port (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, replica: str, host: str = "0.0.0.0", port: int = 0,
                 advertise_host: str | None = None, tries: int = 64) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ReplicaLabelled(registry, replica))
        self.replica = replica
        last: OSError | None = None
        # a fixed port is the first of a range: several replicas may share a node
        for p in ([0] if port == 0 else range(port, port + tries)):
            try:
                self._server, self._thread = start_http_server(p, host, self.registry)
                break
            except OSError as e:
                last = e
        else:
            raise OSError(f"no free port for replica metrics in {port}..{port + tries - 1}: {last}")
        self.port = self._server.server_port
        self.url = f"http://{advertise_host or _reachable_host(host)}:{self.port}/metrics"

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _reachable_host(host: str) -> str:
    if host not in ("0.0.0.0", "::", ""):
        return host
    return socket.gethostbyname(socket.gethostname())


def merge_expositions(texts: Iterable[str]) -> bytes:
    """Several Prometheus text expositions (already labelled apart) as one: one HELP/TYPE per family."""
    families: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            known = families.get(family.name)
            if known is None:
                families[family.name] = known = Metric(family.name, family.documentation, family.type, family.unit)
            known.samples.extend(family.samples)

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            return iter(families.values())

    return generate_latest(_Merged())  # type: ignore[arg-type]


def http_sd_targets(targets: Mapping[str, str], labels: Mapping[str, str] | None = None) -> list[dict]:
    """Prometheus http_sd_config JSON for replica id -> metrics URL (one target group per replica). The
    samples carry their `replica` label already; as a target label too it would come back renamed
    `exported_replica`, so the group labels say only where to scrape."""
    out = []
    for _, url in sorted(targets.items()):
        hostport, _, path = url.split("://", 1)[-1].partition("/")
        out.append({"targets": [hostport], "labels": {**(labels or {}), "__metrics_path__": "/" + path}})
    return out
