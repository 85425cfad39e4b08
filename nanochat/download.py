"""
Atomic, retrying HTTP downloads: the file lands complete or not at all.
The one download routine: the reference pretraining shards, the task data and the CORE bundle use it.
"""
import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request

from nanochat.common import logger, sha256_file


class DownloadError(RuntimeError):
    """A download that failed for good. `status` is the HTTP status when the server refused the request
    (404...), else None; `attempts` is how many transfers were tried."""

    def __init__(self, message, status=None, attempts=1):
        super().__init__(message)
        self.status, self.attempts = status, attempts


def download_file(url, dest, validate=None, sha256=None, retries=3, backoff=1.0, timeout=60.0, refetch_invalid=False):
    """Download `url` to `dest` atomically and return `dest`.

    The body goes to a temp file next to `dest` (`<name>.<random>.part`), is checked (byte count against
    Content-Length, `sha256` if given, then `validate(temp_path)`, which should raise on bad content) and
    only then renamed onto `dest`, so `dest` is either absent or complete. Network errors, HTTP 5xx/429 and
    short bodies are retried `retries` times with exponential backoff (backoff, 2*backoff, ...); other HTTP
    errors (404...) are not. A failed check is not retried either (a static file comes back the same),
    unless `refetch_invalid`: then it is one more failed attempt of the same budget, for sources whose
    corrupt transfers pass the byte count (a proxy or mirror that mangles large files).
    Raises DownloadError naming the url, with its `status` and `attempts`."""
    dest = os.path.abspath(os.path.expanduser(dest))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    for attempt in range(retries + 1):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=os.path.basename(dest) + ".", suffix=".part")
        try:
            try:
                with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, f, 1 << 20)
                    f.flush()
                    os.fsync(f.fileno())
                    expected, received = response.headers.get("Content-Length"), f.tell()
                if expected is not None and received != int(expected):  # the server hung up early
                    raise DownloadError(f"{url}: transfer interrupted, incomplete download "
                                        f"({received} of {expected} bytes)")
            except urllib.error.HTTPError as e:
                retryable = e.code >= 500 or e.code == 429
                error = DownloadError(f"{url}: HTTP {e.code} {e.reason}", status=e.code)
            except (OSError, http.client.HTTPException, DownloadError) as e:  # refused/reset, timeout, short body
                retryable = True
                error = e if isinstance(e, DownloadError) else DownloadError(f"{url}: {type(e).__name__}: {e}")
            else:
                try:
                    if sha256 is not None and (got := sha256_file(tmp)) != sha256.lower():
                        raise ValueError(f"sha256 mismatch: expected {sha256}, got {got}")
                    if validate is not None:
                        validate(tmp)
                except Exception as e:  # whatever the check raises, even an OSError of a gzip reader
                    retryable = refetch_invalid
                    error = DownloadError(f"{url}: downloaded file failed validation: {e}")
                    error.__cause__ = e
                else:
                    os.replace(tmp, dest)
                    return dest
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        error.attempts = attempt + 1
        if not retryable or attempt == retries:
            raise error
        wait = backoff * (2 ** attempt)
        logger.warning(f"download failed ({error}); retrying in {wait:.1f}s ({attempt + 1}/{retries})")
        time.sleep(wait)
