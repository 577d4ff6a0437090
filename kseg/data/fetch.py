"""``kseg fetch``: put the raw dataset named by ``data.source`` into ``data.dir``, atomically.

The new dataset is built in a staging folder next to ``data.dir`` and swapped in only when it is
complete (:func:`kseg.fsutil.atomic_dir`), so a failed or interrupted fetch leaves the previous
``data/`` exactly as it was. The data parameters used are saved next to it as
``fetch_params.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kseg.config import Params, save_config
from kseg.fsutil import atomic_dir

log = logging.getLogger(__name__)

FETCH_PARAMS_FILE = "fetch_params.json"


def fetch(params: Params) -> Path:
    """Fetches or generates the dataset of ``params.data`` into ``params.data.dir``.

    Args:
        params: Validated parameters.

    Returns:
        The data folder.
    """
    cfg = params.data
    target = Path(cfg.dir)
    with atomic_dir(target) as staging:
        if cfg.source == "synthetic":
            from kseg.data.synthetic import generate

            rows = generate(cfg.synthetic, staging)
            log.info("generated %d synthetic tiles (seed %d)", len(rows), cfg.synthetic.seed)
        else:
            from kseg.data.sources import fetch_source

            fetch_source(cfg, staging)
        save_config(cfg, staging / FETCH_PARAMS_FILE)
    return target
