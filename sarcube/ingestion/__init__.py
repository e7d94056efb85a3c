"""``sarcube ingest``: ALOS-2 scenes + HR-LULC tiles -> the calibrated Zarr v3 datacube.

The job, on a Dask cluster: inspect every input in parallel, create or open the cube, write the
label layer and then each new or changed date of SAR, transactionally (a failure leaves the
previous complete slices exactly as they were; a killed run re-runs to the same cube).

The modules:

- ``driver``: ``ingest``, the run (inspection, the cube's grid, the order of the steps);
- ``target``: the cube written (its URL checked, its grid, removal after a failed first run);
- ``tasks``: the per-block compute in the Dask workers (reading, calibrating, resampling);
- ``transaction``: the label layer and the slices' attempts, committed in one registry write;
- ``report``: ``IngestReport`` and ``IngestError``.

Every public name is importable from ``sarcube.ingestion``.
"""

from __future__ import annotations

from .driver import ingest
from .report import IngestError, IngestReport
from .target import check_bbox
from .tasks import (
    EDGE_NODATA_PCT,
    SOURCE_MARGIN_PX,
    STRIP_ROWS,
    ingest_label_block,
    ingest_sar_block,
    label_block,
    local_frame,
    resample_scene_power,
)

__all__ = [
    "EDGE_NODATA_PCT",
    "SOURCE_MARGIN_PX",
    "STRIP_ROWS",
    "IngestError",
    "IngestReport",
    "check_bbox",
    "ingest",
    "ingest_label_block",
    "ingest_sar_block",
    "label_block",
    "local_frame",
    "resample_scene_power",
]
