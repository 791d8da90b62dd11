"""``python -m ad.export BUNDLE --format onnx|openvino [--out FILE] [--batch dynamic|N] [--int8]`` (also ``ad-export``).

Exit status: 0 written and checked against torch, 1 an int8 file refused for the image AUROC it loses,
2 refused (bad input, a missing package, a parity failure): one line on stderr, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ad.errors import ADError, one_line_errors


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
    int8 = parser.add_argument_group("int8 (OpenVINO, needs nncf: the export extra)")
    int8.add_argument("--int8", action="store_true", help="quantise the backbone to int8 (post-training, NNCF), "
                      "calibrated on good images; refused if it loses more than 0.01 image AUROC on the run's test "
                      "images")
    int8.add_argument("--calibration", type=Path, metavar="DIR",
                      help="good images to calibrate on (default: the run's training images, from its saved config)")
    int8.add_argument("--force", action="store_true", help="write the int8 file even when it loses more AUROC")
    args = parser.parse_args(argv)
    if (args.calibration or args.force) and not args.int8:
        parser.error("--calibration and --force go with --int8")
    return args


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = parse_args(argv)
    from ad.export.export import export_bundle

    done = export_bundle(args.bundle, args.format, args.out, batch_size(args.batch), args.input,
                         verify=not args.no_verify, int8=args.int8, calibration=args.calibration, force=args.force)
    for warning in done.quantised.warnings if done.quantised else ():
        print(f"warning: {warning}", file=sys.stderr)
    files = [done.path, done.path.with_suffix(".bin")] if done.path.suffix == ".xml" else [done.path]
    size = sum(file.stat().st_size for file in files)
    checked = ("not checked" if done.score_error is None else
               f"{'its fp32 graph ' if done.quantised else ''}matches torch fp32 (scores {done.score_error:.1g}"
               + (f", maps {done.map_error:.1g}" if done.map_error is not None else "") + ")")
    print(f"{done.method} -> {done.path} ({size / 2**20:.1f} MiB; outputs {', '.join(done.outputs)}); {checked}"
          + int8_summary(done.quantised), flush=True)
    return 0


def int8_summary(quantised) -> str:
    """``; int8 backbone (N calibration images), image AUROC a fp32 -> b int8 on M test images`` or nothing."""
    if quantised is None:
        return ""
    found = f"; int8 backbone ({quantised.calibration_images} calibration images)"
    if quantised.drop is None:
        return found + ", AUROC drop not measured"
    return (found + f", image AUROC {quantised.auroc_fp32:.4f} fp32 -> {quantised.auroc_int8:.4f} int8 "
            f"on {quantised.test_images} test images")


if __name__ == "__main__":
    sys.exit(main())
