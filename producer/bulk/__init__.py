"""Bulk jobs: a JSONL file through the workers into a JSONL file, resumable after a crash.

:mod:`.job` runs a job, :mod:`.jsonl` reads and writes its rows, :mod:`.signed_ids` names the requests so only
the job's own replies count, :mod:`.cli` is ``producer bulk``.
"""

from producer.bulk.job import BulkJob, BulkOptions, BulkSummary, JobFailedError

__all__ = ["BulkJob", "BulkOptions", "BulkSummary", "JobFailedError"]
