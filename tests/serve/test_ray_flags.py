"""`ember serve --replicas` flags and the Ray Serve application's options, without starting Ray:
bad values are one line naming the flag; `serve run` arguments go through the same checks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ember.cliconfig import CLIConfigError, parse_config
from ember.commands.serve import ServeConfig
from ember.errors import EmberError


def parse(*argv: str) -> ServeConfig:
    return parse_config(ServeConfig, ["--model", "m", *argv], "ember serve")


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--min-replicas", "1"], "needs both --min-replicas and --max-replicas"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas <= --max-replicas"),
    (["--replicas", "5", "--min-replicas", "1", "--max-replicas", "4"], "must lie in"),
    (["--target-ongoing-requests", "8"], "applies to autoscaling"),
    (["--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "500"], "(0, --max-num-seqs"),
    (["--replicas", "2", "--replica-cpus", "0"], "--replica-cpus must be > 0"),
    (["--replicas", "2", "--replica-metrics-port", "70000"], "--replica-metrics-port"),
])
def test_bad_replica_flags_are_one_clear_line(argv, message):
    with pytest.raises(EmberError) as e:
        parse(*argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_flags():
    assert not parse().on_ray
    cfg = parse("--replicas", "2", "--replica-cpus", "1.5", "--no-prefix-routing")
    assert cfg.on_ray and cfg.replicas == 2 and cfg.replica_cpus == 1.5 and not cfg.prefix_routing
    assert parse("--min-replicas", "0", "--max-replicas", "4").on_ray


def test_deployment_options():
    ray_serve = pytest.importorskip("ray.serve", reason="pip install 'ember[ray]'")  # noqa: F841
    from ember.serve.ray import replica_options

    fixed = replica_options(parse("--replicas", "2", "--replica-cpus", "1", "--max-num-seqs", "32",
                                  "--max-queue-len", "100"))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 132   # the engine's own admission limit, not Ray's default of 5
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert fixed["request_router_config"]["request_router_class"] == "ember.serve.ray_router.PrefixAffinityRouter"
    auto = replica_options(parse("--min-replicas", "1", "--max-replicas", "8", "--replica-gpus", "1",
                                 "--max-num-seqs", "64"))
    assert auto["num_replicas"] == "auto"
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "initial_replicas": 1,
                                          "target_ongoing_requests": 32.0}


def test_serve_run_arguments_are_checked(tiny_dir):
    pytest.importorskip("ray.serve", reason="pip install 'ember[ray]'")
    from ray.serve import Application

    from ember.serve.ray import build_app

    assert isinstance(build_app({"model": str(tiny_dir), "replicas": "2", "replica-cpus": "0.5"}), Application)
    with pytest.raises(CLIConfigError, match="unknown field.*replica_count"):
        build_app({"model": str(tiny_dir), "replica_count": "2"})
    with pytest.raises(EmberError, match="does not exist"):
        build_app({"model": str(tiny_dir / "nope"), "replicas": "2"})


def test_cli_error_is_one_line_without_starting_ray(tmp_path):
    pytest.importorskip("ray.serve", reason="pip install 'ember[ray]'")
    r = subprocess.run([sys.executable, "-m", "ember", "serve", "--model", str(tmp_path / "missing"),
                        "--replicas", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
