"""`viscpm serve --replicas N`: the same OpenAI-compatible app as a Ray Serve application of N replicas (the `scale`
extra). Each replica loads the models and serves `make_app` with its own model thread and dynamic batching; Ray
Serve's proxy spreads the requests over the replicas, on one machine or a Ray cluster's many.

`serve run` takes the application builder as well (every model folder must exist on every node):

    serve run viscpm.serving.scale_out:build model=/models/viscpm-chat-hf replicas=4
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ray import serve
from ray.serve import Application

from .server import KEEP_ALIVE_SECONDS, Batching, Limits, VisCPMService, make_app


@serve.ingress()
class VisCPMReplica:
    """One replica: `VisCPMService` on the given folders, behind `make_app`."""

    def __init__(self, chat_model: str | None, paint_model: str | None, limits: dict, paint_steps: int, batching: dict):
        self.service = VisCPMService(
            chat_model and Path(chat_model),
            paint_model and Path(paint_model),
            Limits(**limits),
            paint_steps,
            Batching(**batching),
        )

    def __serve_build_asgi_app__(self):
        return make_app(self.service)


def application(
    chat_model: Path | None,
    paint_model: Path | None,
    replicas: int,
    replica_cpus: float = 1,
    limits: Limits | None = None,
    paint_steps: int = 50,
    batching: Batching | None = None,
) -> Application:
    """The Ray Serve application: ``replicas`` copies of the server, each holding ``replica_cpus`` of Ray's CPUs
    (its torch threads follow them). Each replica takes up to two batches of requests at a time, so that the next
    batch gathers while one runs; Ray queues the rest."""
    batching = batching or Batching()
    deployment = serve.deployment(
        VisCPMReplica,
        name="viscpm",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=2 * batching.max_rows,
    )
    return deployment.bind(
        str(chat_model.resolve()) if chat_model else None,
        str(paint_model.resolve()) if paint_model else None,
        asdict(limits or Limits()),
        paint_steps,
        asdict(batching),
    )


def build(args: dict[str, str]) -> Application:
    """`serve run viscpm.serving.scale_out:build model=DIR paint_model=DIR replicas=N replica_cpus=C`: absent
    folders are the shipped toy models."""
    from .. import defaults

    unknown = set(args) - {"model", "paint_model", "replicas", "replica_cpus"}
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}: give model, paint_model, replicas, replica_cpus")
    return application(
        Path(args.get("model", defaults.CHAT)),
        Path(args.get("paint_model", defaults.PAINT)),
        int(args.get("replicas", 1)),
        float(args.get("replica_cpus", 1)),
    )


def serve_forever(app: Application, host: str, port: int, ready: Callable[[], None]) -> None:
    """Starts Ray Serve's proxy on ``host``:``port`` (on a local Ray cluster, or the one RAY_ADDRESS names), deploys
    ``app``, calls ``ready()`` once every replica is up, and serves until SIGINT or SIGTERM; then it shuts the
    application down."""
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    # after ray.init, which installs its own: a KeyboardInterrupt, the same way out as Ctrl-C
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": KEEP_ALIVE_SECONDS})
        serve.run(app, name="viscpm", route_prefix="/")
        ready()
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
