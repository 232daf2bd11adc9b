"""Length-prefixed JSON frames over raw file descriptors: the host <-> worker process protocol.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. Raw fds (not
Python file objects) keep select() and the bytes actually read in agreement.
"""
from __future__ import annotations

import json
import os
import struct


def _read_exact(fd: int, n: int) -> bytes | None:
  buf = b''
  while len(buf) < n:
    chunk = os.read(fd, n - len(buf))
    if not chunk:
      return None
    buf += chunk
  return buf


def read_blob_or_none(fd: int) -> bytes | None:
  """The next frame's raw bytes, or None at end of file."""
  header = _read_exact(fd, 4)
  if header is None:
    return None
  (size,) = struct.unpack('>I', header)
  return _read_exact(fd, size)


def write_blob(fd: int, blob: bytes) -> None:
  """Writes one frame of raw bytes (blocking until fully written)."""
  data = memoryview(struct.pack('>I', len(blob)) + blob)
  while data:
    data = data[os.write(fd, data):]


def read_frame_or_none(fd: int) -> dict | None:
  """The next frame's JSON value, or None at end of file."""
  body = read_blob_or_none(fd)
  return None if body is None else json.loads(body)


def write_frame(fd: int, message) -> None:
  """Writes one JSON-serialisable value as a frame (blocking until fully written)."""
  write_blob(fd, json.dumps(message).encode())
