"""Imported by the fork server before any task: lazy third-party state every task would otherwise build again.

A task process starts as a copy of the fork server, so what is built here once is inherited for free. Only
third-party libraries are touched: fedshop's own code comes from the FAB in each task (client/executor/task.py).
"""

from __future__ import annotations

try:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
except ImportError:  # a transformers without the table: nothing to warm
    pass
else:
    # transformers builds its table of checkpoint weight renamings (about 1,100 compiled regular expressions,
    # 0.1-0.4 s) on first use, and peft's LoRA injection asks for it for every model it wraps.
    get_checkpoint_conversion_mapping("bert")
