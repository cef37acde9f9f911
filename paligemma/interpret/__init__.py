"""Looking inside: attention captured by hooks, maps and rollout, the localisation study, plots and the explorer.

Read in the book's order: `capture` (`record_attention`, `attention_maps`), `rollout` (aggregation and rollout),
`localisation`, `plots`, then `export` (maps as 8-bit rows in one file), `viewer` (the explorer in a page, plain
JavaScript) and `explorer` (new prompts into that viewer, with a kernel).
"""

from .capture import AttentionMaps, attention_maps, record_attention
from .export import export_attention, read_attention_export, write_attention_export
from .rollout import aggregate, as_grid, attention_distance, rollout, rollout_rows
from .viewer import AttentionViewer, write_viewer_page

__all__ = ["AttentionMaps", "AttentionViewer", "aggregate", "as_grid", "attention_distance", "attention_maps",
           "export_attention", "read_attention_export", "record_attention", "rollout", "rollout_rows",
           "write_attention_export", "write_viewer_page"]
