"""Real media files, made here, for tests that must tell a true image or sound from text dressed as one."""

from __future__ import annotations

import base64
import io
import struct
import wave
import zlib


def png(width: int = 4, height: int = 4) -> bytes:
    """A valid RGB PNG of one red colour."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def wav(frames: int = 800) -> bytes:
    """A valid mono 8 kHz WAV of silence."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(8000)
        sound.writeframes(b"\x00\x00" * frames)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_data_url(width: int = 4, height: int = 4) -> str:
    return "data:image/png;base64," + b64(png(width, height))
