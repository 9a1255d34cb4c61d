"""Real-time ranking from a fedshop model directory: catalog, ranker, business rules, HTTP service."""
