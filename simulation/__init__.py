"""K virtual merchants on one machine: `python -m simulation` (Hydra)."""
