"""Container health check: exit 0 when ``GET /readyz`` answers 200, else 1.

Standard library only (the slim image has no curl). Ready means the package is loaded, validated
and warmed up; while it loads, and during shutdown, /readyz answers 503 and this exits 1.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("CPCNN_PORT", "8000")
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        sys.stderr.write(f"not ready: {url}: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
