"""``python -m sara_edu.sd download [MODEL_ID] --to FOLDER``: fetch SD once, on a machine with network."""
from __future__ import annotations

from ..errors import CheckpointError
from .load import SD15_ID, download_stable_diffusion


def main(argv=None) -> None:
    """``python -m sara_edu.sd download [MODEL_ID] --to FOLDER [--variant fp16]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sara_edu.sd", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download the files load_stable_diffusion needs")
    dl.add_argument("model_id", nargs="?", default=SD15_ID)
    dl.add_argument("--to", dest="local_dir", default=None, help="folder to download into (default: HF cache)")
    dl.add_argument("--variant", default=None, help="e.g. fp16 for half-size weights")
    args = parser.parse_args(argv)
    try:
        folder = download_stable_diffusion(args.model_id, args.local_dir, args.variant)
    except CheckpointError as e:
        parser.exit(1, f"error: {e}\n")
    print(f"downloaded {args.model_id} to {folder}; load it with load_stable_diffusion({str(folder)!r})")


if __name__ == "__main__":
    main()
