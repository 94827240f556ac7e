"""Streaming HTTP(S) byte source for the Pile reader, standard library only.

``open_url(url)`` sends a GET and returns an ``HTTPStream``: a read-only, non-seekable raw binary
stream that the caller may wrap in ``io.BufferedReader`` and hand to a zstd stream reader. The
body is read in the caller's chunks and never buffered whole, so a 14 GB shard costs a few
buffers of memory.

Retry contract
    Opening: an HTTP error status raises ``HTTPSourceError`` naming the URL and the status.
    5xx, 429, refused or reset connections and timeouts are retried after
    ``min(backoff * 2**k, max_backoff)`` seconds for the k-th retry (k = 0, 1, ...), at most
    ``retries`` times, then fail naming the URL, the number of attempts and the last error.
    Other 4xx statuses fail at once: asking again will not change the answer.

Resume contract
    A connection that drops mid-body (``IncompleteRead``, a reset, a socket timeout, or EOF
    before ``Content-Length`` bytes) is reopened with ``Range: bytes=<bytes_read>-``. The server
    must answer 206 with a ``Content-Range`` starting exactly there; the caller then sees one
    uninterrupted byte stream. A 200 (Range ignored) or any other start offset raises
    ``HTTPSourceError``: restarting from byte 0 would silently duplicate data. So does a total
    size or ETag that differs from the first response's, since the file was replaced.
    The drop and each failed reopening count against the same ``retries`` budget as opening;
    the budget is refilled whenever bytes arrive, so a long download survives any number of
    separate drops as long as each reconnection makes progress.

Truncation without Content-Length
    When the server sends no length (and no chunked framing that breaks mid-chunk), a dropped
    connection looks exactly like the end of the body and cannot be detected here. The zstd
    layer above must catch the truncated frame.

Retries and resumes are logged at WARNING on ``logging.getLogger(__name__)`` with the URL and
byte offset.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")

# Everything a network read or request can raise when the peer or the path misbehaves.
# ssl.SSLError and socket timeouts are OSErrors; RemoteDisconnected is both kinds.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


class HTTPSourceError(OSError):
    """A URL could not be opened or read to its end. The message always starts with the URL."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None):
        # One positional argument keeps OSError from reading it as (errno, strerror), and
        # keeps the exception picklable (BaseException.__reduce__ replays args, then __dict__).
        super().__init__(message)
        self.url = url
        self.status = status


class _Transient(Exception):
    """One attempt failed in a way a later attempt may not (5xx, 429, network trouble)."""


def _describe(err: BaseException) -> str:
    text = str(err) or repr(err)
    name = type(err).__name__
    return text if text.startswith(name) else f"{name}: {text}"


def open_url(url: str, *, retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
             timeout: float = 60.0, headers: dict | None = None) -> "HTTPStream":
    """GET ``url`` and return a stream of its body that retries and resumes as the module
    docstring describes. ``timeout`` (seconds) applies to each connect and each socket read;
    ``headers`` are added to every request (they must not set Range)."""
    return HTTPStream(url, retries=retries, backoff=backoff, max_backoff=max_backoff,
                      timeout=timeout, headers=headers)


class HTTPStream(io.RawIOBase):
    """The body of one URL as a raw binary stream that survives dropped connections.

    Attributes: ``url``; ``bytes_read``, bytes delivered to the caller so far; ``size``, the
    body length from Content-Length or Content-Range, or None if the server never said;
    ``resumes``, how many times a dropped connection was resumed with a Range request.
    """

    def __init__(self, url: str, *, retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 30.0, timeout: float = 60.0, headers: dict | None = None):
        super().__init__()
        self._resp = None  # set first: IOBase.__del__ calls close() even if __init__ fails
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"{url!r}: only http:// and https:// URLs are supported")
        if retries < 0 or backoff < 0 or max_backoff < 0 or timeout <= 0:
            raise ValueError(f"{url}: need retries, backoff, max_backoff >= 0 and timeout > 0, "
                             f"got {retries}, {backoff}, {max_backoff}, {timeout}")
        headers = dict(headers or {})
        if any(k.lower() == "range" for k in headers):
            raise ValueError(f"{url}: headers must not set Range; HTTPStream sets it to resume")
        # Range offsets and Content-Length must count the bytes we deliver, so ask for the
        # body as stored rather than re-encoded in transit.
        if not any(k.lower() == "accept-encoding" for k in headers):
            headers["Accept-Encoding"] = "identity"
        self.url = url
        self.bytes_read = 0
        self.size: int | None = None
        self.resumes = 0
        self._retries, self._backoff, self._max_backoff = retries, backoff, max_backoff
        self._timeout = timeout
        self._headers = headers
        self._etag: str | None = None
        self._failures = 0  # failed attempts since bytes last arrived
        self._resp = self._connect()

    def __repr__(self) -> str:
        return (f"HTTPStream({self.url!r}, bytes_read={self.bytes_read}, size={self.size}, "
                f"resumes={self.resumes})")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError(f"{self.url}: I/O operation on closed HTTPStream")
        view = memoryview(b).cast("B")
        if not view.nbytes:
            return 0
        while True:
            if self._resp is None:
                raise HTTPSourceError(f"{self.url}: stream failed earlier at byte "
                                      f"{self.bytes_read}; open the URL again", url=self.url)
            try:
                n = self._resp.readinto(view)
            except _NETWORK_ERRORS as err:
                self._resume(_describe(err))
                continue
            if n:
                self.bytes_read += n
                self._failures = 0
                return n
            # http.client reports an early close as a quiet EOF, not IncompleteRead.
            if self.size is not None and self.bytes_read < self.size:
                self._resume(f"connection closed before byte {self.size}")
                continue
            return 0

    def close(self) -> None:
        resp, self._resp = getattr(self, "_resp", None), None
        if resp is not None:
            with contextlib.suppress(*_NETWORK_ERRORS):
                resp.close()
        super().close()

    def _resume(self, reason: str) -> None:
        with contextlib.suppress(*_NETWORK_ERRORS):
            self._resp.close()
        self._resp = None
        self._resp = self._connect(_Transient(reason))
        if self.bytes_read:
            self.resumes += 1
            log.warning("%s: resumed at byte %d (resume %d)", self.url, self.bytes_read,
                        self.resumes)

    def _connect(self, error: _Transient | None = None):
        """Return a response positioned at ``bytes_read``, retrying transient failures.
        ``error`` is the drop that made this a resume; it counts as a failed attempt."""
        offset = self.bytes_read
        while True:
            if error is not None:
                self._failures += 1
                if self._failures > self._retries:
                    at = f" at byte {offset}" if offset else ""
                    raise HTTPSourceError(
                        f"{self.url}: giving up{at} after {self._failures} failed attempts; "
                        f"last error: {error}", url=self.url) from error
                delay = min(self._backoff * 2 ** (self._failures - 1), self._max_backoff)
                log.warning("%s: %s at byte %d; retry %d of %d in %.2fs", self.url, error, offset,
                            self._failures, self._retries, delay)
                time.sleep(delay)
            try:
                return self._request(offset)
            except _Transient as err:
                error = err

    def _request(self, offset: int):
        """One GET from ``offset``: a checked response, _Transient, or HTTPSourceError."""
        headers = dict(self._headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        try:
            resp = urllib.request.urlopen(request, timeout=self._timeout)
        except urllib.error.HTTPError as err:
            err.close()
            status = f"HTTP {err.code} {err.reason}"
            if err.code == 429 or err.code >= 500:
                raise _Transient(status) from err
            raise HTTPSourceError(f"{self.url}: {status}", url=self.url, status=err.code) from None
        except urllib.error.URLError as err:
            # URLError wraps the socket error (refused, DNS); report the socket error itself.
            cause = err.reason if isinstance(err.reason, BaseException) else err
            raise _Transient(_describe(cause)) from err
        except _NETWORK_ERRORS as err:
            raise _Transient(_describe(err)) from err
        try:
            self._check(resp, offset)
        except BaseException:
            resp.close()
            raise
        return resp

    def _check(self, resp, offset: int) -> None:
        """Make sure ``resp`` continues the body at ``offset``, and learn the size."""
        if offset == 0:
            if resp.status != 200:
                raise HTTPSourceError(f"{self.url}: expected HTTP 200, got {resp.status} "
                                      f"{resp.reason}", url=self.url, status=resp.status)
            total = resp.length  # Content-Length before any read; None if absent or chunked
        else:
            content_range = resp.headers.get("Content-Range", "")
            match = _CONTENT_RANGE.fullmatch(content_range.strip())
            if resp.status != 206 or not match or int(match[1]) != offset:
                answer = (f"HTTP {resp.status}" if resp.status != 206
                          else f"Content-Range {content_range!r}")
                raise HTTPSourceError(
                    f"{self.url}: connection dropped at byte {offset} and the server does not "
                    f"support Range requests (it answered {answer} to 'Range: bytes={offset}-'), "
                    f"so the shard cannot be resumed", url=self.url, status=resp.status)
            total = None if match[3] == "*" else int(match[3])
        if self.size is not None and total is not None and total != self.size:
            raise HTTPSourceError(f"{self.url}: size changed from {self.size} to {total} bytes "
                                  f"while reading at byte {offset}; the file was replaced on the "
                                  f"server", url=self.url)
        etag = resp.headers.get("ETag")
        if self._etag is not None and etag is not None and etag != self._etag:
            raise HTTPSourceError(f"{self.url}: ETag changed from {self._etag} to {etag} while "
                                  f"reading at byte {offset}; the file was replaced on the "
                                  f"server", url=self.url)
        self._etag = self._etag or etag
        if self.size is None:
            self.size = total
