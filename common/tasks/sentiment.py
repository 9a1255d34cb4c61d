"""`sentiment`: review text -> a label read from the data (negative / neutral / positive on the built-in reviews),
saved with the model; accuracy and macro-F1."""

from __future__ import annotations

from common.tasks import synthetic
from common.tasks.base import Task
from common.tasks.registry import register_task


@register_task("sentiment")
class SentimentTask(Task):
    """A sequence classifier over one text."""

    def generate(self, seed: int) -> list[dict[str, object]]:
        """The built-in marketplace's product reviews."""
        s = self.cfg.data.synthetic
        return synthetic.generate_reviews(s.num_merchants, s.num_reviews, seed, s.concentration, s.label_noise)
