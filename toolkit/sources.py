"""Streaming readers for dataset files named by a local path, an http(s) URL or a `pipe:` command.

A dataset root is one of:

    /data/ds                              a local directory
    https://host/ds                       a URL prefix; a file's path follows after a slash
    pipe:aws s3 cp s3://bucket/ds/{} -    a shell command in which `{}` stands for the file's path
                                          relative to the root; the command writes the file to stdout

`source_url(root, "train/train-000000.tar")` names one file under a root. The result is a path,
an http(s) URL or a complete `pipe:` command, which are also the shard URLs that
webdataset.WebDataset reads. `open_source` opens any of the three as a binary stream.

Failures raise SourceError, an OSError whose message names the URL and the HTTP status, or
the command, its exit status and the end of its stderr. HTTP connections time out after
HTTP_TIMEOUT_S seconds without data, and opening a URL is retried on connection errors and on
HTTP statuses that signal a temporary failure.
"""

from __future__ import annotations

import http.client
import io
import logging
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

HTTP_SCHEMES = ("http://", "https://")
PIPE_PREFIX = "pipe:"

# Seconds urllib waits for a connection, and then for each read, before it raises a timeout.
HTTP_TIMEOUT_S = 60.0
# Tries to open a URL, and the delay before the second try. Each further delay doubles.
HTTP_ATTEMPTS = 3
HTTP_RETRY_DELAY_S = 1.0
# Statuses that a later request may not get: timeout, rate limit and server-side failures.
HTTP_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
HTTP_NOT_FOUND = frozenset({404, 410})

# Seconds a command may keep running after it closed its stdout, before it is killed.
PIPE_EXIT_TIMEOUT_S = 60.0
# Characters of a failed command's stderr that its error message quotes.
STDERR_TAIL_CHARS = 500

# A file path under a URL or pipe: root: slash-separated names of letters, digits, '.', '_' and
# '-' that do not start with '.', so it cannot climb out of the root or run shell syntax.
SAFE_RELATIVE_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class SourceError(OSError):
    """A file that could not be opened or read from a URL or a command.

    `status` is the HTTP status or the command's exit status, when there is one.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def not_found(self) -> bool:
        """Whether an HTTP server reported the file as missing (status 404 or 410)."""
        return self.status in HTTP_NOT_FOUND


# ---------------------------------------------------------------------------------------------
# roots and names


def is_url(root: str | Path) -> bool:
    """Return whether `root` is an http(s) URL or a `pipe:` command rather than a local path."""
    if not isinstance(root, str):
        return False
    return root.lower().startswith(HTTP_SCHEMES) or root.startswith(PIPE_PREFIX)


def check_root(root: str | Path) -> None:
    """Raise ValueError for a `pipe:` root without `{}` or a URL whose scheme has no reader."""
    if not isinstance(root, str):
        return
    if root.startswith(PIPE_PREFIX):
        if "{}" not in root:
            raise ValueError(
                f"the pipe: root {root!r} has no {{}}; write {{}} where the command takes the file's path "
                "relative to the dataset root, for example 'pipe:aws s3 cp s3://bucket/dataset/{} -' "
                "or 'pipe:cat /mnt/dataset/{}'"
            )
        return
    if SCHEME.match(root) and not is_url(root):
        scheme = root.split("://", 1)[0]
        hint = "give the local path without file://" if scheme.lower() == "file" else (
            f"read it with a command, for example 'pipe:aws s3 cp {root.rstrip('/')}/{{}} -'"
        )
        raise ValueError(f"unsupported URL scheme {scheme!r} in {root!r}; use http(s)://, pipe: or a local path, or {hint}")


def source_url(root: str | Path, relative: str) -> str:
    """Return the path, URL or `pipe:` command of the file `relative` under a dataset root.

    Raises ValueError for an invalid root, or for a relative path under a URL or pipe: root
    that has characters other than those of SAFE_RELATIVE_PATH.
    """
    check_root(root)
    if not is_url(root):
        return f"{str(root).rstrip('/')}/{relative}"
    if not SAFE_RELATIVE_PATH.fullmatch(relative):
        raise ValueError(
            f"invalid file name {relative!r} under {root}: names read from a URL or pipe: root may contain "
            "only letters, digits, '.', '_', '-' and '/', and no part may start with '.'"
        )
    if root.startswith(PIPE_PREFIX):
        return root.replace("{}", relative)
    return f"{root.rstrip('/')}/{relative}"


# ---------------------------------------------------------------------------------------------
# opening and reading


def open_source(url: str | Path) -> io.RawIOBase | io.BufferedReader:
    """Open a local path, an http(s) URL or a `pipe:COMMAND` for reading bytes from the start.

    Close the stream (or use it in a `with` block): closing a pipe checks the command's exit
    status. Raises SourceError when a URL or command cannot be opened, and OSError for a local
    file that cannot.
    """
    if not is_url(url):
        return open(url, "rb")
    if url.startswith(PIPE_PREFIX):
        return PipeSource(url[len(PIPE_PREFIX) :])
    return HttpSource(url)


def read_source_bytes(url: str | Path) -> bytes:
    """Return the whole content of a local path, an http(s) URL or a `pipe:COMMAND`."""
    with open_source(url) as source:
        return source.read()


class HttpSource(io.RawIOBase):
    """The body of one HTTP GET response, streamed.

    Raises SourceError naming the URL when the connection fails or closes before the bytes
    that the Content-Length header announced have arrived.

    NOTE: a download that fails part way is not resumed (no Range request), so the stream skips
    the rest of that shard for this epoch.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.response: http.client.HTTPResponse | None = None  # set before open_http can raise, for close()
        self.response = open_http(url)
        length = self.response.headers.get("Content-Length", "")
        self.expected = int(length) if length.isdigit() else None
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            count = self.response.readinto(buffer)
        except (OSError, http.client.HTTPException) as error:
            raise SourceError(f"reading {self.url} failed after {self.received} bytes: {error!r}") from None
        self.received += count

        # http.client returns no bytes, without an error, when the server closes a response early
        if count == 0 and len(buffer) > 0 and self.expected is not None and self.received < self.expected:
            raise SourceError(f"the connection for {self.url} closed after {self.received} of {self.expected} bytes")
        return count

    def close(self) -> None:
        if not self.closed and self.response is not None:
            self.response.close()
        super().close()


def open_http(url: str) -> http.client.HTTPResponse:
    """Send a GET request, retrying connection failures and HTTP_RETRY_STATUSES up to HTTP_ATTEMPTS times."""
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as error:
            error.close()
            failure = SourceError(f"HTTP {error.code} {error.reason} for {url}", status=error.code)
            if error.code not in HTTP_RETRY_STATUSES:
                raise failure from None
        except urllib.error.URLError as error:
            failure = SourceError(f"connection to {url} failed: {error.reason}")
        except (OSError, http.client.HTTPException) as error:
            failure = SourceError(f"request for {url} failed: {error!r}")

        if attempt == HTTP_ATTEMPTS:
            break
        delay = HTTP_RETRY_DELAY_S * 2 ** (attempt - 1)
        logger.warning("%s; try %d of %d in %.0f s", failure, attempt + 1, HTTP_ATTEMPTS, delay)
        time.sleep(delay)
    if HTTP_ATTEMPTS > 1:
        failure = SourceError(f"{failure} (gave up after {HTTP_ATTEMPTS} tries)", status=failure.status)
    raise failure


class PipeSource(io.RawIOBase):
    """The stdout of a shell command, streamed, as webdataset's `pipe:` URLs run it.

    On close after the end of the output, an exit status other than 0 raises SourceError naming
    the command, the status and the end of its stderr. A stream closed before the end of the
    output (the reader had what it needed) kills the command and ignores its status, because a
    command that loses its reader exits with SIGPIPE or an error of its own.
    """

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command
        self.at_end = False
        self.process: subprocess.Popen | None = None  # set before Popen can raise, for close()
        # stderr goes to a file because a command that fills an unread stderr pipe would block
        self.stderr = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(
                command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr
            )
        except OSError as error:
            raise SourceError(f"starting the command {command!r} failed: {error}") from None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.process.stdout.readinto(buffer)
        if count == 0 and len(buffer) > 0:
            self.at_end = True
        return count

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.process is not None:
                self.finish()
        finally:
            self.stderr.close()
            super().close()

    def finish(self) -> None:
        """Close stdout and reap the command, raising SourceError if it failed after writing all its output."""
        self.process.stdout.close()
        if not self.at_end:
            if self.process.poll() is None:
                self.process.kill()
            status = self.process.wait()
            logger.debug("stopped reading %r before its end; it exited with status %s", self.command, status)
            return

        try:
            status = self.process.wait(timeout=PIPE_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise SourceError(
                f"the command {self.command!r} closed its output but did not exit within {PIPE_EXIT_TIMEOUT_S:.0f} s; "
                "it was killed"
            ) from None
        if status != 0:
            ending = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise SourceError(f"the command {self.command!r} {ending}{self.stderr_tail()}", status=status)

    def stderr_tail(self) -> str:
        """Return ': ' and the last STDERR_TAIL_CHARS characters of the command's stderr, or '' if it wrote none."""
        self.stderr.seek(0, io.SEEK_END)
        size = self.stderr.tell()
        self.stderr.seek(max(0, size - 4 * STDERR_TAIL_CHARS))
        text = self.stderr.read().decode("utf-8", errors="replace").strip()
        if not text:
            return ""
        return ": " + " | ".join(text[-STDERR_TAIL_CHARS:].splitlines())
