"""Bulk jobs: a JSONL file through the workers into a JSONL file, resumable after a crash.

:mod:`.job` runs a job (the run loop) on :mod:`.broker` (connections, the job lock, the results queue);
:mod:`.ledger` keeps each row's fate (pure); :mod:`.replies` checks each reply; :mod:`.signed_ids` names the
requests so only the job's own replies count; :mod:`.state` is the state file (secret, pinned version);
:mod:`.jsonl` reads and writes the rows; :mod:`.options` holds what a job is asked and reports; :mod:`.cli` is
``producer bulk``.
"""

from producer.bulk.job import BulkJob
from producer.bulk.options import BulkOptions, BulkSummary, JobFailedError

__all__ = ["BulkJob", "BulkOptions", "BulkSummary", "JobFailedError"]
