"""Run infrastructure: typed config (conf/'s schema and checks), errors, checkpoints, results and plots,
experiment tracking, logs, the offline environment and process helpers. Imports no other floor of common."""
