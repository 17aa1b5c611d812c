"""kNN accuracy of the backbone's features: watching self-supervised pretraining without labels
in training."""
from passl.data import build_dataloader
from passl.engine.hooks.base import HOOKS, Hook
from passl.errors import ConfigError
from passl.evaluation.knn import ENGINES, knn_evaluate
from passl.evaluation.knn_eval import deterministic_block


@HOOKS.register()
class KNNHook(Hook):
    """Evaluator: weighted kNN top-1/top-5 (percent) of ``trainer.model.extract_features``.

    The labelled ``train`` set is the memory bank and ``val`` the queries (protocol in
    :mod:`passl.evaluation.knn`). The trainer calls :meth:`evaluate` every ``eval_interval``
    epochs (top-level config key) and after the last one, and writes ``knn_top1`` and
    ``knn_top5`` to an ``eval`` record of metrics.jsonl. The loaders are built on first use.

    Config keys (``hooks: [{name: KNNHook, ...}]``):
        train: dataloader block (``dataset``, ``sampler``, ``loader``) of the memory bank;
            every image is read once, in order (shuffle and drop_last are turned off). Give
            it the deterministic val transforms, not the SSL augmentations.
        val: dataloader block of the queries.
        k: neighbours that vote (20 in the InstDisc/DINO protocol).
        temperature: votes are weighted ``exp(cosine similarity / temperature)``.
        engine: ``dygraph`` (default), ``inference`` or ``onnxruntime``: features from a
            Paddle Inference predictor (or an onnxruntime session, the ``[onnx]`` extra)
            compiled from the model at each evaluation (same to ~1e-6 relative; faster for a
            ResNet-50 on large sets, slower for small ones: compiling takes seconds).
    """

    def __init__(self, train, val, k=20, temperature=0.07, engine="dygraph"):
        if engine not in ENGINES:
            raise ConfigError(f"KNNHook: engine {engine!r} is not one of {', '.join(ENGINES)}")
        self.train_cfg, self.val_cfg = train, val
        self.k, self.temperature, self.engine = k, temperature, engine
        self.loaders = None

    def evaluate(self, trainer):
        if self.loaders is None:
            seed = trainer.cfg.get("seed", 0)
            self.loaders = tuple(build_dataloader(deterministic_block(block), mode="val", seed=seed)
                                 for block in (self.train_cfg, self.val_cfg))
        result = knn_evaluate(trainer.model, *self.loaders, k=self.k, temperature=self.temperature,
                              engine=self.engine)
        return {"knn_top1": result["knn_top1"], "knn_top5": result["knn_top5"]}
