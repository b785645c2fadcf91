"""The per-query appearance conditions (overcast, sunny, dusk, night, rain, fog) a dataset root may record.

The synthetic city (data/synth/generate.py) writes its parameters and each query's condition into
`<root>/synth_config.json`; the pictures (retrieval/ranking.py's grid) label queries with them and the exports
(data/synth/export.py) write them as the VPR file name's note. Reading them needs nothing of the city's
generator, so it lives here, in the data layer that everything above may import.

    query_conditions(root, n_query)   -> each query's condition, or None (not a synthetic city)
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILE = "synth_config.json"


def query_conditions(root: str | Path, n_query: int | None = None) -> list[str] | None:
    """Each query's appearance condition (overcast, sunny, dusk, night, rain, fog), in query order, as
    `generate_city` stored it in the city's config file; None for a dataset without one (not a synthetic
    city, an older or unreadable config, or one whose count differs from `n_query`)."""
    try:
        conditions = json.loads((Path(root) / CONFIG_FILE).read_text()).get("conditions")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(conditions, list) or (n_query is not None and len(conditions) != n_query):
        return None
    return [str(c) for c in conditions]
