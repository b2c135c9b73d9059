"""The flags of `ember serve` that put the engine on Ray Serve replicas (ReplicaFlags, a config mixin).

    ember serve --model DIR --replicas 2 --replica-cpus 1            # two engines behind one port
    ember serve --model DIR --min-replicas 1 --max-replicas 8 --target-ongoing-requests 32

Not a verb: the part of `ember serve`'s config that only replicas use, kept apart so the verb's
module stays small. Nothing here imports Ray or the server packages: the flags are parsed and
checked (one clear line for a bad value) before anything starts; ember/serve/ray.py turns them
into deployment options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.errors import EmberError


class ReplicaConfigError(EmberError):
    """A replica / autoscaling flag out of range."""


@dataclass
class ReplicaFlags:
    """Ray Serve replicas of the engine (all kw_only; mixed into ServeConfig)."""

    replicas: int | None = field(default=None, kw_only=True, metadata={
        "help": "engine replicas behind one HTTP port under Ray Serve (pip install 'ember[ray]'); "
                "unset: one process without Ray"})
    min_replicas: int | None = field(default=None, kw_only=True, metadata={
        "help": "autoscaling: fewest replicas (with --max-replicas; --replicas is then the initial count)"})
    max_replicas: int | None = field(default=None, kw_only=True, metadata={"help": "autoscaling: most replicas"})
    target_ongoing_requests: float | None = field(default=None, kw_only=True, metadata={
        "help": "autoscaling: requests in flight per replica to aim for (default: half of --max-num-seqs)"})
    replica_cpus: float = field(default=1.0, kw_only=True, metadata={
        "help": "CPUs Ray reserves for each replica (also its torch threads unless --threads)"})
    replica_gpus: float = field(default=0.0, kw_only=True, metadata={"help": "GPUs Ray reserves for each replica"})
    ray_address: str | None = field(default=None, kw_only=True, metadata={
        "help": "Ray cluster to join, e.g. auto or ray://head:10001 (default: $RAY_ADDRESS, else a local Ray)"})
    prefix_routing: bool = field(default=True, kw_only=True, metadata={
        "help": "send requests sharing a prompt prefix to the same replica (its prefix cache)"})
    replica_metrics_port: int = field(default=0, kw_only=True, metadata={
        "help": "first port of each replica's own /metrics (0: any free port; the front lists them)"})

    @property
    def on_ray(self) -> bool:
        return self.replicas is not None or self.min_replicas is not None or self.max_replicas is not None

    def check_replicas(self, max_num_seqs: int) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ReplicaConfigError(f"--replicas must be >= 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ReplicaConfigError("autoscaling needs both --min-replicas and --max-replicas")
        if self.min_replicas is not None and self.max_replicas is not None:
            if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
                raise ReplicaConfigError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                                         f"{self.min_replicas} and {self.max_replicas}")
            if self.replicas is not None and not self.min_replicas <= self.replicas <= self.max_replicas:
                raise ReplicaConfigError(f"--replicas {self.replicas} (the initial count) must lie in "
                                         f"--min-replicas..--max-replicas ({self.min_replicas}..{self.max_replicas})")
        elif self.target_ongoing_requests is not None:
            raise ReplicaConfigError("--target-ongoing-requests applies to autoscaling: "
                                     "give --min-replicas and --max-replicas too")
        if self.target_ongoing_requests is not None and not 0 < self.target_ongoing_requests <= max_num_seqs:
            raise ReplicaConfigError(f"--target-ongoing-requests must be in (0, --max-num-seqs = {max_num_seqs}], "
                                     f"got {self.target_ongoing_requests}")
        if self.replica_cpus <= 0 or self.replica_gpus < 0:
            raise ReplicaConfigError(f"--replica-cpus must be > 0 and --replica-gpus >= 0, got "
                                     f"{self.replica_cpus} and {self.replica_gpus}")
        if not 0 <= self.replica_metrics_port < 65536:
            raise ReplicaConfigError(f"--replica-metrics-port must be in 0..65535, got {self.replica_metrics_port}")
