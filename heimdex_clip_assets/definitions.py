"""The code location, loaded the way Dagster's project templates do: everything under ``defs/``.

``defs/`` holds the assets, checks, jobs, sensor and schedule as module-level objects, and
``defs/resources.py`` the resources and executor as a ``@dg.definitions`` function.
"""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
