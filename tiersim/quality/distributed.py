"""The grid's generations on a Ray cluster: one actor per worker holds the model, every run is a task.

Loading a 7B-32B model takes minutes, so it happens once per actor (one per GPU with ``--device cuda``,
one per CPU otherwise), never per task. The driver hands each ready actor at most ``DEPTH`` runs at a
time, so a slow or restarting worker never hoards the queue, and gets the results back as they finish:
journaling them stays in the driver (:func:`tiersim.quality.grid.run_grid`), the single writer of the
run journal. A worker that dies is restarted by Ray (``max_restarts``), which reloads the model and
reruns the runs it held (``max_task_retries``); tiersim adds no retry logic of its own.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable, Iterable

from tiersim.cluster import RETRIES, cluster_count, get_result
from tiersim.errors import TiersimError
from tiersim.quality.grid import Generated, Job, generate_run

#: Runs queued on one actor at once: one running, one waiting, so no worker idles between runs.
DEPTH = 2


class GridWorker:
    """A Ray actor (see :class:`RayRunner`): the model, loaded once, generating one run per call."""

    def __init__(self, load: Callable[[], tuple]):
        self.model = load()[0]
        self.pid = os.getpid()

    def ready(self) -> tuple[int, dict]:
        return self.pid, versions()

    def run(self, index: int, input_ids, cell, max_new_tokens: int, generation_kwargs: dict | None):
        device = getattr(self.model, "device", None)
        ids, seconds, counts = generate_run(self.model, input_ids.to(device) if device is not None else input_ids,
                                            cell, max_new_tokens, generation_kwargs)
        return index, ids, seconds, counts, self.pid


def versions() -> dict:
    """The library versions that decide a run's tokens (the journal keys runs by the driver's)."""
    import torch
    import transformers

    import tiersim

    return {"tiersim": tiersim.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def default_workers(ray, gpu: bool) -> int:
    """One actor per GPU (``gpu``) or per CPU of the connected cluster."""
    count = cluster_count(ray, "GPU" if gpu else "CPU")
    if count < 1:
        raise TiersimError("--device cuda --ray: the Ray cluster has no GPUs" if gpu
                           else "--ray: the Ray cluster has no CPUs")
    return count


class RayRunner:
    """A :data:`tiersim.quality.grid.Runner` on Ray; ``status()`` says how many workers are up."""

    def __init__(self, ray, load: Callable[[], tuple], workers: int, gpu: bool = False):
        """``load`` builds (model, tokenizer) in each actor, like :func:`tiersim.models.load_model` (it is
        pickled to the workers: a library function or a partial of one); ``workers`` actors are started,
        each holding one CPU, or one GPU with ``gpu``."""
        if workers < 1:
            raise TiersimError(f"--ray-workers must be >= 1, got {workers}")
        self.ray = ray
        self.load = load
        self.workers = workers
        self.gpu = gpu
        self.pids: dict[int, int] = {}  # actor number -> pid of its live process
        self.restarts = 0  # actors seen answering from a new process (Ray restarted them)

    def status(self) -> str:
        text = f"workers {len(self.pids)}/{self.workers} alive"
        return text + (f", {self.restarts} restarted" if self.restarts else "")

    def __call__(self, jobs: list[Job], max_new_tokens: int, generation_kwargs: dict | None) -> Iterable[Generated]:
        if not jobs:
            return
        ray = self.ray
        actor_class = ray.remote(GridWorker).options(
            num_cpus=1, num_gpus=1 if self.gpu else 0, max_restarts=RETRIES, max_task_retries=RETRIES)
        actors = [actor_class.remote(self.load) for _ in range(min(self.workers, len(jobs)))]
        starting = {actor.ready.remote(): n for n, actor in enumerate(actors)}
        queue = deque(jobs)
        running: dict = {}  # object ref -> actor number
        load = [0] * len(actors)
        try:
            while queue or running:
                done, _ = ray.wait(list(starting) + list(running), num_returns=1)
                ref = done[0]
                if ref in starting:
                    pid, found = get_result(ray, ref)
                    _check_versions(found)
                    self.pids[starting.pop(ref)] = pid
                    finished = None
                else:
                    n = running.pop(ref)
                    load[n] -= 1
                    index, ids, seconds, counts, pid = get_result(ray, ref)
                    if pid != self.pids.get(n):
                        self.restarts += 1
                        self.pids[n] = pid
                    finished = (index, ids, seconds, counts)
                for n in self.pids:  # refill before handing the result back, so no worker waits on the journal
                    while queue and load[n] < DEPTH:
                        index, sample, cell = queue.popleft()
                        running[actors[n].run.remote(index, sample.input_ids.cpu(), cell, max_new_tokens,
                                                     generation_kwargs)] = n
                        load[n] += 1
                if finished is not None:
                    yield finished
        finally:
            for actor in actors:
                ray.kill(actor)
            self.pids.clear()


def _check_versions(found: dict) -> None:
    """Refuse a worker whose libraries differ from the driver's: its tokens could differ, under the same key."""
    here = versions()
    if found != here:
        diff = ", ".join(f"{k} {found.get(k)} (driver: {v})" for k, v in here.items() if found.get(k) != v)
        raise TiersimError(f"a Ray worker runs {diff}: install the same versions on every node")


