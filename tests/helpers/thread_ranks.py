"""W ranks that are threads of this process: their all_gather, and running one function on every rank."""

from __future__ import annotations

import threading

import torch


class ThreadRanks:
    """The collectives of W ranks that are threads of this process."""

    def __init__(self, world_size: int):
        self.world_size, self.barrier, self.slots = world_size, threading.Barrier(world_size, timeout=120), {}

    def all_gather(self, rank: int, rows: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = rows.clone()
        self.barrier.wait()
        out = torch.cat([self.slots[r] for r in range(self.world_size)])
        self.barrier.wait()  # every rank has read the slots before any writes the next round
        return out

    def run(self, fn) -> list:
        """fn(rank) on one thread per rank (named str(rank)); their results in rank order. A rank that
        raises aborts the barrier, so the others stop waiting, and its error is raised here."""
        results, errors = [None] * self.world_size, []

        def target(r):
            try:
                results[r] = fn(r)
            except BaseException as e:  # noqa: BLE001 - raised below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,), name=str(r)) for r in range(self.world_size)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return results
