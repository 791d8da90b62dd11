"""``python -m ad.export BUNDLE --format onnx|openvino [--out FILE] [--batch dynamic|N]`` (also ``ad-export``).

Exit status: 0 written and checked against torch, 2 refused (bad input, a missing package, a parity
failure): one line on stderr, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ad.errors import ADError


def batch_size(text: str) -> int | None:
    """``dynamic`` (any batch size) or a fixed positive number of images."""
    if text == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ADError(f"--batch: '{text}' is not 'dynamic' or a number of images") from None
    if value < 1:
        raise ADError(f"--batch: {value} must be 'dynamic' or a positive number of images")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ad.export import FORMATS
    from ad.export.metadata import INPUT_KINDS

    parser = argparse.ArgumentParser(
        prog="ad-export", description="Export a fitted ad model as one detector file (ONNX or OpenVINO IR) with "
        "preprocessing, scoring, map post-processing and thresholds inside.",
        epilog="examples:\n  ad-export outputs/runs/line2 --format onnx\n"
               "  ad-export outputs/runs/line2 --format openvino --out line2.xml --batch 1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="run folder or its model/ folder")
    parser.add_argument("--format", required=True, help=f"{' or '.join(FORMATS)}: ONNX (ONNX Runtime) or OpenVINO IR")
    parser.add_argument("--out", type=Path, help="file to write (default: <run folder>/export/<method>.onnx|.xml)")
    parser.add_argument("--batch", default="dynamic", metavar="dynamic|N",
                        help="batch dimension: dynamic (default) or a fixed number of images")
    parser.add_argument("--input", default="uint8", help=f"pixel type the file takes: {' or '.join(INPUT_KINDS)} "
                        "(uint8 0..255, the default; float32 0..1)")
    parser.add_argument("--no-verify", action="store_true", help="skip running the file once against torch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = parse_args(argv)
    from ad.export.export import export_bundle

    try:
        done = export_bundle(args.bundle, args.format, args.out, batch_size(args.batch), args.input,
                             verify=not args.no_verify)
    except ADError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    files = [done.path, done.path.with_suffix(".bin")] if done.path.suffix == ".xml" else [done.path]
    size = sum(file.stat().st_size for file in files)
    checked = ("not checked" if done.score_error is None else f"matches torch fp32 (scores {done.score_error:.1g}"
               + (f", maps {done.map_error:.1g}" if done.map_error is not None else "") + ")")
    print(f"{done.method} -> {done.path} ({size / 2**20:.1f} MiB; outputs {', '.join(done.outputs)}); {checked}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
