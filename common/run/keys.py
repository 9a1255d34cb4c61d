"""Metric names every floor writes and reads (training results, the wire, results.json)."""

NUM_EXAMPLES = "num-examples"  # Flower's weighted_by_key
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
