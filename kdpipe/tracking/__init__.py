"""MLflow: run layout, params, the stage cache and its locks."""

from kdpipe.tracking.store import (
    RUN_TYPE_TAG,
    STAGE_TAG,
    cache_key,
    find_reusable_run,
    flatten,
    log_flat_params,
    setup_tracking,
    stage_lock,
)

__all__ = ["RUN_TYPE_TAG", "STAGE_TAG", "cache_key", "find_reusable_run", "flatten", "log_flat_params",
           "setup_tracking", "stage_lock"]
