"""DeepCluster-v2's training-time work: the memory bank, k-means at each epoch start, and
frozen prototypes."""
import time

import numpy as np
import paddle

from passl import distributed
from passl.data import set_loader_epoch
from passl.engine.hooks.base import HOOKS
from passl.engine.hooks.prototype_freezing import FreezePrototypesHook
from passl.errors import ConfigError
from passl.models.losses.deepclusterv2 import cluster_banks, initial_centroid_indices
from passl.models.losses.deepclusterv2_bank import MemoryBank, reshard_banks


@HOOKS.register()
class DeepClusterV2Hook(FreezePrototypesHook):
    """Owns the memory bank of a ``DeepClusterV2`` model and clusters it every epoch.

    Config keys (``hooks`` entry ``name: DeepClusterV2Hook``):
        freeze_prototypes_epochs / freeze_prototypes_niters: as
            :class:`~passl.engine.hooks.prototype_freezing.FreezePrototypesHook` (the
            reference freezes them for the whole run: the prototypes are the centroids);
        kmeans_iterations: E + M rounds of k-means per head and epoch (10).

    What happens, as in facebookresearch/swav ``main_deepclusterv2.py``:

    - before the first epoch of a new run, one pass over the epoch-0 batches without
      gradients fills the bank: each assignment crop through the network alone, the model
      in training mode (so, as in the reference, BatchNorm uses and updates batch
      statistics);
    - at the start of every epoch, per head h, :func:`spherical_kmeans` on bank
      ``h mod len(crops_for_assign)`` from K rows of rank 0's bank drawn from (seed, epoch,
      h); the head's prototypes become the centroids and every process gets the
      assignments of all samples (``model.loss.assignments``);
    - after every step the step's embeddings and indices overwrite the bank's next rows.

    State (per process, in checkpoints): the bank, and the epoch's assignments (in rank 0's
    state only, the same on every process), so a run resumed mid-epoch continues with the
    clusters it had. Resuming on another number of
    processes (epoch checkpoints only) re-shards the banks in global sample order
    (:func:`~passl.models.losses.deepclusterv2_bank.reshard_banks`); k-means then runs on
    the same embeddings, from centroids drawn from the new rank 0's rows.
    """

    def __init__(self, freeze_prototypes_niters=None, freeze_prototypes_epochs=None,
                 kmeans_iterations=10):
        super().__init__(freeze_prototypes_niters, freeze_prototypes_epochs)
        if not isinstance(kmeans_iterations, int) or kmeans_iterations < 0:
            raise ConfigError(f"DeepClusterV2Hook.kmeans_iterations: expected an integer >= 0, "
                              f"got {kmeans_iterations!r}")
        self.kmeans_iterations = kmeans_iterations
        self.bank = None
        self.assignments = None  # [H, dataset size] of the epoch clustered_epoch
        self.clustered_epoch = None
        self.rank = 0

    def before_run(self, trainer):
        super().before_run(trainer)
        loss = trainer.model.loss
        if not hasattr(loss, "assignments"):
            raise ConfigError("DeepClusterV2Hook: the model has no cluster assignments to set; "
                              "use it with model.name: DeepClusterV2")
        self.rank = trainer.rank
        if self.bank is None:
            self.bank = self._filled_bank(trainer)
        if self.clustered_epoch == trainer.start_epoch:  # resumed mid-epoch: rank 0 saved it
            heads = len(trainer.model.head.prototype_weights())
            table = paddle.to_tensor(self.assignments) if trainer.rank == 0 else \
                paddle.zeros([heads, len(trainer.train_loader.dataset)], dtype="int64")
            loss.assignments = distributed.broadcast(table, src=0)
            self.assignments = loss.assignments.numpy()

    def before_epoch(self, trainer):
        if self.clustered_epoch == trainer.epoch:
            return  # resumed mid-epoch: the saved assignments (set in before_run) hold
        started = time.perf_counter()
        model, loss = trainer.model, trainer.model.loss
        sizes = [weight.shape[1] for weight in model.head.prototype_weights()]
        rank0_rows = distributed.all_gather_object(self.bank.rows)[0]
        starts = [initial_centroid_indices(trainer.cfg.get("seed", 0), trainer.epoch, head,
                                           rank0_rows, k) for head, k in enumerate(sizes)]
        centroids, assignments = cluster_banks(
            self.bank.embeddings, self.bank.indices, sizes, len(trainer.train_loader.dataset),
            self.kmeans_iterations, starts)
        with paddle.no_grad():
            for weight, head_centroids in zip(model.head.prototype_weights(), centroids):
                weight.set_value(head_centroids.t())  # Linear.weight is [D, K]: one column each
        self.assignments, self.clustered_epoch = assignments, trainer.epoch
        loss.assignments = paddle.to_tensor(assignments)
        rows = self._rows_per_epoch(trainer)
        if self.bank.rows != rows:  # resumed on another layout: the bank had other rows
            self.bank = MemoryBank(len(loss.crops_for_assign), rows, self.bank.embeddings.shape[2])
        used = ", ".join(f"{len(np.unique(a[a >= 0]))}/{k}" for a, k in zip(assignments, sizes))
        trainer.logger.info(f"DeepCluster-v2: k-means of {len(sizes)} head(s) on "
                            f"{rank0_rows} bank rows of rank 0 in "
                            f"{time.perf_counter() - started:.2f} s; clusters used: {used}")

    def after_iter(self, trainer):
        outputs = trainer.outputs
        start = trainer.inner_iter * outputs["indices"].shape[0]
        self.bank.write(start, outputs["indices"], outputs["bank_embeddings"])

    @staticmethod
    def _rows_per_epoch(trainer):
        return trainer.iters_per_epoch * (trainer.global_batch_size // trainer.world_size)

    @paddle.no_grad()
    def _filled_bank(self, trainer):
        """The reference's ``init_memory``: the bank of the epoch-0 batches (see class doc)."""
        started = time.perf_counter()
        model, loader = trainer.model, trainer.train_loader
        crops_for_assign = model.loss.crops_for_assign
        bank = None
        set_loader_epoch(loader, trainer.start_epoch)
        model.train()
        for step, batch in enumerate(loader):
            crops, _, indices = trainer.normalize_batch(batch)
            with trainer.amp.autocast():
                embeddings = paddle.stack([model.embed([crops[c]]).astype("float32")
                                           for c in crops_for_assign])
            if bank is None:
                bank = MemoryBank(len(crops_for_assign), self._rows_per_epoch(trainer),
                                  embeddings.shape[2])
            bank.write(step * indices.shape[0], indices, embeddings)
        trainer.logger.info(f"DeepCluster-v2: memory bank of {bank.rows} rows x "
                            f"{len(crops_for_assign)} crop(s) x {bank.embeddings.shape[2]} "
                            f"filled in {time.perf_counter() - started:.1f} s")
        return bank

    def state_dict(self):
        if self.bank is None:
            return {}
        state = {"bank": self.bank.state_dict()}
        if self.clustered_epoch is not None:
            state["clustered_epoch"] = self.clustered_epoch
            if self.rank == 0:  # the same table on every process: saved once, 4 bytes a value
                state["assignments"] = self.assignments.astype(np.int32)
        return state

    def set_state_dict(self, state):
        if state.get("bank") is None:
            return
        self.bank = MemoryBank(1, 0, 1)
        self.bank.set_state_dict(state["bank"])
        if state.get("clustered_epoch") is not None:
            saved = state.get("assignments")
            self.assignments = None if saved is None else np.asarray(saved).astype(np.int64)
            self.clustered_epoch = int(state["clustered_epoch"])

    def state_from_ranks(self, rank_states, saved_global_batch, trainer):
        """The banks re-sharded in global sample order (class doc); the assignments are not
        needed: an epoch checkpoint clusters again at the next epoch's start."""
        banks = [state.get("bank") for state in rank_states]
        if not all(bank is not None for bank in banks):
            return {}
        bank = reshard_banks(banks, trainer.world_size, trainer.rank)
        trainer.logger.info(f"DeepCluster-v2 memory bank re-sharded: "
                            f"{sum(len(b['indices']) for b in banks)} rows from {len(banks)} "
                            f"process(es) -> {len(bank['indices'])} on this one (of "
                            f"{trainer.world_size}), in sample order")
        return {"bank": bank}
