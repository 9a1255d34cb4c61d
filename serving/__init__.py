"""Real-time ranking from a fedshop model directory: catalog, ranker, business rules, HTTP service."""

from common.run.env import set_offline

set_offline()  # before transformers / huggingface_hub are imported: nothing downloads at run time
