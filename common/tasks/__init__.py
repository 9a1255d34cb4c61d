"""The machine learning: learning tasks behind one `Task` interface (common.tasks.base; registry in
common.tasks.registry) and their shared parts: data loading and partitioning, the model factory, the training
loop, metrics, the held-out evaluation, the bi-encoder, the exchanged state (which tensors train and travel),
the marketplace generator and record-level DP-SGD. Imports common.run only, and no Flower (flwr_datasets'
partitioners excepted)."""
