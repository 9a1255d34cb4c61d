"""fedshop's shared code, in three floors, each importing only the floors below it (tests/test_flower_patches.py):

- `common.run`: run infrastructure: typed config, errors, checkpoints, results and plots, tracking, logs, env.
- `common.tasks`: the machine learning: the `Task` interface and its registry, one module per task, and their
  shared parts (data loading and partitioning, model factory, training loop, metrics, evaluation, the marketplace
  generator, record-level DP-SGD). No Flower.
- `common.protocol`: the Flower protocol: wire keys and codecs, exchanged state, merchant state in
  `Context.state`, privacy math, Flower version checks.
"""
