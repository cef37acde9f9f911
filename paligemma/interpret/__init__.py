"""Looking inside: attention captured by hooks, maps and rollout, the localisation study, plots and the explorer.

Read in the book's order: `capture` (`record_attention`, `attention_maps`), `rollout` (aggregation and rollout),
`localisation`, `plots`, then `explorer`.
"""

from .capture import AttentionMaps, attention_maps, record_attention
from .rollout import aggregate, as_grid, attention_distance, rollout, rollout_rows

__all__ = ["AttentionMaps", "aggregate", "as_grid", "attention_distance", "attention_maps", "record_attention",
           "rollout", "rollout_rows"]
