"""Render an adalayers HTML report in headless Chromium and save a screenshot (PNG).

    python benchmarks/render_report.py REPORT.html --output report.png
    python benchmarks/render_report.py RUN [RUN ...] --output report.png   # writes the report too

Runs (or a folder ``adalayers compare`` wrote) are first turned into ``report.html`` beside the
screenshot. Chromium runs offline with a throw-away profile; the page must need no network. Needs
the ``chromium`` binary (Debian: ``apt-get install chromium``). Prints one JSON line: the page,
the screenshot and its size in bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The first headless-capable Chromium on ``PATH``."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, output: Path, *, width: int = 1200, height: int = 2000) -> Path:
    """Render ``page`` (a local HTML file) to the PNG ``output``.

    Raises:
        FileNotFoundError: no Chromium on ``PATH``.
        RuntimeError: Chromium failed or wrote no image.
    """
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(BROWSERS)})")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="adalayers-chromium-") as profile:
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={output.resolve()}",
            f"--window-size={width},{height}",
            page.resolve().as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if not output.is_file() or output.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr}")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="a report .html, or run / comparison folders")
    parser.add_argument("--output", default="report.png", help="the screenshot to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args(argv)
    output = Path(args.output)
    if len(args.inputs) == 1 and args.inputs[0].endswith(".html"):
        page = Path(args.inputs[0])
        if not page.is_file():
            print(f"render_report: {page} not found", file=sys.stderr)
            return 2
    else:
        from adalayers.report import write_report

        page = write_report(args.inputs, output.with_suffix(".html"))
    try:
        screenshot(page, output, width=args.width, height=args.height)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"render_report: {err}", file=sys.stderr)
        return 2
    size = output.stat().st_size
    print(json.dumps({"page": str(page), "screenshot": str(output), "bytes": size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
