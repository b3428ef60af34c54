"""adlfs, the fsspec filesystem for Azure Blob Storage, with the job's retries and timeouts.

adlfs builds its Azure SDK client with the SDK's defaults, 3 retries waiting 15, 18 and 24 s and a
300 s read timeout, and passes none of its own arguments to it (fsspec/adlfs#502); it applies
timeouts given to it to uploads and downloads only, not to listings or deletes. This class builds
the client again, on the same account URL and credential, with JOB_STORAGE_RETRIES attempts and
bounded timeouts on every request. storage.STORES names it for az://, abfs:// and abfss://.
"""

import random

from adlfs import AzureBlobFileSystem
from azure.storage.blob.aio import BlobServiceClient, ExponentialRetry

MAX_BACKOFF = 20.0  # seconds between attempts at most, as botocore's standard retry mode


class _FullJitterRetry(ExponentialRetry):
    """The storage SDK's retry policy (what it retries, how many times) with botocore's standard
    mode's backoff: a random wait of up to 2^(n-1) s before the nth retry, at most MAX_BACKOFF.
    The SDK's own formula waits initial + base^n (+- jitter) with no cap: 2.5 s at least before
    the first retry even with initial 0.5 s and base 2, where a 503 usually clears in well under a second."""

    def get_backoff_time(self, settings):
        return random.uniform(0, min(MAX_BACKOFF, 2 ** max(0, settings["count"] - 1)))


class AzureBlob(AzureBlobFileSystem):
    protocol = AzureBlobFileSystem.protocol  # az, abfs, abfss

    def __init__(self, *args, attempts: int = 4, connection_timeout: int = 10, read_timeout: int = 60, **kwargs):
        self.attempts = attempts  # read by do_connect(), which adlfs's __init__ calls
        super().__init__(*args, connection_timeout=connection_timeout, read_timeout=read_timeout, **kwargs)

    def do_connect(self):
        super().do_connect()
        sdk = self.service_client
        retries = max(0, self.attempts - 1)  # JOB_STORAGE_RETRIES counts attempts, as botocore's max_attempts
        self.service_client = BlobServiceClient(
            sdk.url,  # with a SAS token, if that is the credential
            credential=sdk.credential,
            # 5xx but 501/505, 408, connection errors and timeouts (azure.storage.blob's StorageRetryPolicy)
            retry_policy=_FullJitterRetry(retry_total=retries, retry_connect=retries, retry_read=retries,
                                          retry_status=retries),
            connection_timeout=self._timeout_kwargs["connection_timeout"],
            read_timeout=self._timeout_kwargs["read_timeout"],
        )
