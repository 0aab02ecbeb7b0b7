"""Distributed coordination of a sweep's ranks under torchrun: rank and world, barrier, rank-0
broadcast and the atomic work counter in the rendezvous store (all no-ops in a single process)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, List, Optional


class _Dist:
    """Rank, world, barrier, rank-0 broadcast and an atomic work counter in the rendezvous store."""

    def __init__(self, timeout_s: float) -> None:
        self.rank, self.world, self.local_rank = 0, 1, 0
        self.owns_group = False
        self.store = None
        self.base_store = None
        self._local = {"next": 0, "done": 0}
        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        import torch.distributed as dist

        self.dist = dist
        if dist.is_available() and (dist.is_initialized() or env_world > 1):
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
                self.owns_group = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
            try:
                from torch.distributed.distributed_c10d import _get_default_store

                self.base_store = _get_default_store()
            except Exception:  # pragma: no cover - private API moved: fall back to static sharding
                self.base_store = None

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj if self.rank == 0 else None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def open_queue(self, nonce: str) -> None:
        if self.active and self.base_store is not None:
            from torch.distributed import PrefixStore

            self.store = PrefixStore(f"vital_fast_sweep/{nonce}/", self.base_store)

    def claim(self, n_pending: int, claimed_static: List[int]) -> Optional[int]:
        """The next pending target's position, or None when the queue is empty."""
        if not self.active:
            i = self._local["next"]
            self._local["next"] += 1
        elif self.store is not None:
            i = int(self.store.add("next", 1)) - 1
        else:  # static round-robin
            i = self.rank + self.world * len(claimed_static)
        if i >= n_pending:
            return None
        claimed_static.append(i)
        return i

    def add_done(self, k: int) -> int:
        if self.active and self.store is not None:
            return int(self.store.add("done", k))
        self._local["done"] += k
        return self._local["done"]

    def close(self) -> None:
        if self.owns_group and self.dist.is_initialized():
            self.dist.destroy_process_group()
