"""A safetensors file's header (8-byte length, then JSON), read and checked against the file's size.

Cheap (the header only), so a truncated or damaged weight file is named before anything loads it:
the base's checks (peftko.model.base), the memory plan and a built base's check on use
(peftko.model.built_base) all read it here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from peftko.core.errors import UserError
from peftko.core.paths import peftko_home


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of one safetensors file (8-byte length + JSON), checked against the file size."""
    def broken(why: str) -> UserError:
        if Path(path).resolve().is_relative_to((peftko_home() / "bases").resolve()):  # peftko built it
            return UserError(f"{path} is truncated or corrupted ({why}); run the command again and peftko "
                             f"builds the base again (or delete {Path(path).parent} first)")
        return UserError(f"{path} is truncated or corrupted ({why}); download it again")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise broken(f"only {len(raw)} bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise broken(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError):
        raise broken("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise broken("its header is not a JSON object")
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2]
    if 8 + n + max(ends, default=0) > size:
        raise broken(f"{size} bytes, the header promises {8 + n + max(ends)}")
    return header
