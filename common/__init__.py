"""fedshop's machine learning: data, model, training, metrics and checkpoints (no Flower imports)."""
