"""
Atomic, retrying HTTP downloads: the file lands complete or not at all.
Used by the task-data and CORE-bundle downloaders.
"""
import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request

from nanochat.common import logger


class DownloadError(RuntimeError):
    pass


def _fetch_to(url, fileobj, timeout):
    """Stream `url` into `fileobj`; raise when the body is shorter than the announced Content-Length."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        expected = response.headers.get("Content-Length")
        received = 0
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            fileobj.write(chunk)
            received += len(chunk)
    if expected is not None and received != int(expected):
        raise DownloadError(f"{url}: incomplete download ({received} of {expected} bytes)")


def download_file(url, dest, validate=None, sha256=None, retries=3, backoff=1.0, timeout=60.0):
    """Download `url` to `dest` atomically and return `dest`.

    The body goes to a temp file next to `dest`, is checked (byte count against Content-Length, `sha256`
    if given, then `validate(temp_path)`, which should raise on bad content) and only then renamed onto
    `dest`, so `dest` is either absent or complete. Network errors, HTTP 5xx/429 and short bodies are
    retried `retries` times with exponential backoff (backoff, 2*backoff, ...); other HTTP errors (404...)
    and failed checks are not retried. Raises DownloadError naming the url."""
    dest = os.path.abspath(os.path.expanduser(dest))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    attempt = 0
    while True:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=os.path.basename(dest) + ".", suffix=".part")
        try:
            try:
                with os.fdopen(fd, "wb") as f:
                    _fetch_to(url, f, timeout)
                    f.flush()
                    os.fsync(f.fileno())
            except urllib.error.HTTPError as e:
                retryable = e.code >= 500 or e.code == 429
                error = DownloadError(f"{url}: HTTP {e.code} {e.reason}")
            except (OSError, http.client.HTTPException, DownloadError) as e:  # refused/reset, timeout, short body
                retryable = True
                error = e if isinstance(e, DownloadError) else DownloadError(f"{url}: {type(e).__name__}: {e}")
            else:
                try:
                    if sha256 is not None and _sha256_of(tmp) != sha256.lower():
                        raise ValueError(f"sha256 mismatch: expected {sha256}, got {_sha256_of(tmp)}")
                    if validate is not None:
                        validate(tmp)
                except Exception as e:  # the same bytes would come back: no retry
                    raise DownloadError(f"{url}: downloaded file failed validation: {e}") from e
                os.replace(tmp, dest)
                return dest
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if not retryable or attempt >= retries:
            raise error
        wait = backoff * (2 ** attempt)
        logger.warning(f"download failed ({error}); retrying in {wait:.1f}s ({attempt + 1}/{retries})")
        time.sleep(wait)
        attempt += 1


def _sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
