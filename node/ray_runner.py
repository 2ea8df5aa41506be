"""Pipeline runs on a Ray cluster (``[ray] address``): the scale-out executor of the job runner.

The node keeps claiming, finishing and failing jobs in its store (node/jobs.py's JobRunner); only
*where the pipeline runs* changes. Model workers are Ray actors placed by resources (1 GPU each,
or 1 CPU each on a cluster without GPUs), spread over the cluster's nodes; each configures the
models in its constructor and keeps them loaded across jobs. An actor reads the series from the
spool and writes into the results folder by absolute path: data_dir is shared storage mounted at
the same place on every Ray node.

A worker or machine that dies mid-job fails that attempt (the store's attempt accounting, as for
a crashed local worker process) and the job runs again on another actor; result UIDs are derived
deterministically, so the re-run writes the same objects, and the node finishes the job once.
Ray restarts the dead actor (``max_restarts=-1``) where resources allow; it takes jobs again once
it answers.

Only imported when ``[ray] address`` is set: the embedded default never imports Ray.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from vesalius.node.checks import ConfigError
from vesalius.node.config import Config
from vesalius.node.jobs import PipelineCall, WorkerLost, _warm_up, routed_models

if TYPE_CHECKING:
    from vesalius.inference.models.spec import ModelSpec

log = logging.getLogger("vesalius.ray")
NAMESPACE = "vesalius"
PING_S = 5.0  # how long one readiness check of an actor waits before checking for shutdown


class PipelineActor:
    """A model worker on a Ray node: the configured models, loaded once and kept across jobs."""

    def __init__(self, specs: dict[str, ModelSpec], gpu_slots: int, models: tuple[str, ...]) -> None:
        from vesalius.inference.memory import map_large_blocks
        from vesalius.inference.models.registry import configure
        from vesalius.node.logs import install as redact_library_logs

        map_large_blocks()  # its threads' freed arrays do not stay resident (inference.memory)
        redact_library_logs()  # no patient name from a library warning in the cluster's logs
        configure(specs, gpu_slots)
        _warm_up(models)

    def node(self) -> str:
        """The Ray node this actor runs on (its id); answers once the models are warm."""
        return str(ray.get_runtime_context().get_node_id())

    def run(self, call: PipelineCall) -> dict[str, Any]:
        return call.run()


def connect(address: str) -> dict[str, float]:
    """Join the cluster as a driver (namespace "vesalius") and return its resources; a cluster
    that cannot be reached is a ConfigError at start-up, not a traceback."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ConfigError(f"ray.address: cannot reach the Ray cluster at {address}: "
                          f"{err.strerror or err}") from None
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
    except Exception as err:  # Ray's own reasons (no local Ray node, version mismatch): one line
        raise ConfigError(f"ray.address: could not join the Ray cluster at {address}: "
                          f"{_first_line(err)}") from None
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def actor_counts(config: Config, resources: dict[str, float]) -> tuple[int, int]:
    """(GPU actors, CPU actors): by default one per GPU of the cluster, or ``workers`` CPU actors
    when there is no GPU actor; ``[ray] gpu_actors`` / ``cpu_actors`` (not -1) say otherwise."""
    gpus = int(resources.get("GPU", 0))
    gpu_actors = gpus if config.ray.gpu_actors < 0 else config.ray.gpu_actors
    cpu_actors = (0 if gpu_actors else config.workers) if config.ray.cpu_actors < 0 else config.ray.cpu_actors
    return gpu_actors, cpu_actors


def _first_line(err: BaseException) -> str:
    """Ray's messages run to many lines (and tracebacks): the first is the reason."""
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


class RayWorkers:
    """The executor on a Ray cluster: an idle queue of warm actors, one job each at a time."""

    def __init__(self, config: Config) -> None:
        resources = connect(config.ray.address)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log.info("ray cluster address=%s nodes=%d cpus=%g gpus=%g memory_gb=%.1f", config.ray.address,
                 len(nodes), resources.get("CPU", 0), resources.get("GPU", 0),
                 resources.get("memory", 0) / 2**30)
        gpu_actors, cpu_actors = actor_counts(config, resources)
        if gpu_actors + cpu_actors == 0:
            ray.shutdown()
            raise ConfigError("ray: cpu_actors and gpu_actors are both 0: no model worker would run")
        # Ray restarts an actor whose worker or node died, where resources allow; its job is not
        # retried by Ray (max_task_retries=0) but by the store, on whichever actor is free
        actor = ray.remote(max_restarts=-1, max_task_retries=0)(PipelineActor)
        spread = {"scheduling_strategy": "SPREAD"}  # across nodes: a dead machine takes few actors
        # the models' settings only: the node's config (destinations, tokens) stays on the node
        args = (config.models, config.gpu_jobs_per_device, routed_models(config))
        self._actors: list[ActorHandle] = (
            [actor.options(num_cpus=1, num_gpus=1, **spread).remote(*args) for _ in range(gpu_actors)]
            + [actor.options(num_cpus=1, **spread).remote(*args) for _ in range(cpu_actors)])
        log.info("ray model workers gpu=%d cpu=%d", gpu_actors, cpu_actors)
        self.slots = len(self._actors)
        self._idle: queue.Queue[int] = queue.Queue()  # indexes into _actors
        self._node_of: dict[int, str] = {}
        self._stopping = threading.Event()
        for index in range(len(self._actors)):
            self._admit(index)

    def _admit(self, index: int) -> None:
        """Put an actor in the idle queue once it answers: warm after its start, or restarted
        (maybe on another node) after it died; until then it gets no job."""
        handle = self._actors[index]

        def wait() -> None:
            told = False
            while not self._stopping.is_set():
                try:
                    node: str = ray.get(handle.node.remote(), timeout=PING_S)
                except GetTimeoutError:  # still warming up, or waiting for resources to restart on
                    continue
                except Exception as err:  # dead, restarting, or Ray disconnected at shutdown
                    if not told and not self._stopping.is_set():
                        log.warning("ray model worker %d unavailable (%s: %s); waiting for Ray to "
                                    "restart it", index, type(err).__name__, _first_line(err))
                        told = True
                    self._stopping.wait(1.0)
                    continue
                self._node_of[index] = node
                log.info("ray model worker ready worker=%d node=%s", index, node[:12])
                self._idle.put(index)
                return

        threading.Thread(target=wait, name="ray-admit", daemon=True).start()

    @contextmanager
    def slot(self, timeout: float) -> Iterator[Callable[[PipelineCall], dict[str, Any]] | None]:
        try:
            index = self._idle.get(timeout=timeout)
        except queue.Empty:
            yield None
            return
        handle, lost = self._actors[index], False

        def run(call: PipelineCall) -> dict[str, Any]:
            nonlocal lost
            log.info("job runs on ray job=%d worker=%d node=%s", call.job_id, index,
                     self._node_of[index][:12])
            try:
                summary: dict[str, Any] = ray.get(handle.run.remote(call))
                return summary
            except RayTaskError as err:  # the pipeline's own exception, raised as itself
                raise (err.cause if isinstance(err.cause, Exception) else err) from None
            except RayError as err:  # the actor's worker process or node died
                lost = True
                raise WorkerLost(f"Ray worker lost ({type(err).__name__}: its process or node died)") from err

        try:
            yield run
        finally:
            if lost:
                self._admit(index)
            else:
                self._idle.put(index)

    def interrupt(self) -> None:
        self._stopping.set()
        for handle in self._actors:
            with suppress(RayError, ConnectionError):  # the actor, or the whole cluster, is gone already
                ray.kill(handle, no_restart=True)

    def close(self) -> None:
        ray.shutdown()
        log.info("disconnected from the Ray cluster")
