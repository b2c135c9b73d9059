"""PrefixAffinityRouter: Ray Serve's request router for ember's engine replicas, by prompt prefix.

    deployment.options(request_router_config={
        "request_router_class": "ember.serve.ray_router.PrefixAffinityRouter",
        "request_router_kwargs": {"imbalance_threshold": 8}})
    handle.forward.remote(raw_request, prefix_hashes=prefix_hashes(path, body))

Ray Serve calls `choose_replicas` for every request sent through a handle to the deployment; the
front (ray.py) passes the request's chained block hashes (prefix_routing.py) as the keyword
`prefix_hashes`. The policy is PrefixAffinity's: the replica last sent the longest matching prefix,
unless it has `imbalance_threshold` more requests in flight than the least loaded one. Requests
without hashes (short prompts, other routes) go to the least loaded replica, as they do when the
preferred one refuses (it is at max_ongoing_requests): the second rank is every other candidate.
Queue lengths are Ray's own cache of each replica's ongoing requests (0 when not yet known).
A choice is recorded when it is made and again once the request is routed (to the replica that
took it, should the preferred one have refused).
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ember.serve.prefix_routing import PrefixAffinity


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve RequestRouter over PrefixAffinity (see the module docstring)."""

    def initialize_state(self, imbalance_threshold: int = 8, max_entries: int = 1 << 18, **_: Any) -> None:
        self.affinity = PrefixAffinity(imbalance_threshold, max_entries)

    def _queue_len(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id: r for r in candidate_replicas}
        queue_lens = {rid: self._queue_len(r) for rid, r in by_id.items()}
        hashes = _hashes(pending_request)
        chosen = self.affinity.choose(hashes, queue_lens)
        if hashes:
            # recorded now, not only once routed: requests arriving together are chosen for before
            # any of them is routed, and would otherwise scatter a shared prefix over the replicas
            self.affinity.record(hashes, chosen)
        rest = sorted((r for rid, r in by_id.items() if rid != chosen), key=self._queue_len)
        return [[by_id[chosen]], rest] if rest else [[by_id[chosen]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hashes = _hashes(pending_request)
        if hashes:
            self.affinity.record(hashes, replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.affinity.forget(replica_id)


def _hashes(pending_request: PendingRequest | None) -> list[int]:
    if pending_request is None:
        return []
    hashes = pending_request.kwargs.get("prefix_hashes")
    return list(hashes) if isinstance(hashes, (list, tuple)) else []
