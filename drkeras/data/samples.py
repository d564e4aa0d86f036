"""A real fundus photograph for a first prediction, with no dataset downloaded.

scikit-image ships one colour fundus photograph of a normal left eye (1411 x 1411 JPEG,
``skimage.data.retina()``), released under the Creative Commons CC0 1.0 Universal public domain
dedication (as its docstring states). :func:`write_retina` copies its bytes unchanged, so the
file graded is the photograph itself, not a re-encoding.

Command line (what README's quick start runs)::

    python -m drkeras.data.samples --out runs/example     # writes runs/example/retina.jpg
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
from typing import Optional, Sequence

__all__ = ["RETINA_LICENCE", "retina_source", "write_retina"]

RETINA_LICENCE = "CC0 1.0 Universal (public domain dedication), shipped with scikit-image"


def retina_source() -> pathlib.Path:
    """The path of scikit-image's ``retina.jpg`` (it ships in the package; no download)."""
    import skimage.data

    path = pathlib.Path(skimage.data.data_dir) / "retina.jpg"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: this scikit-image install lacks its bundled retina photograph "
            "(reinstall the pinned scikit-image with 'make venv')"
        )
    return path


def write_retina(folder) -> pathlib.Path:
    """Copy the photograph into ``folder`` (created) as ``retina.jpg``; returns its path."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "retina.jpg"
    shutil.copyfile(retina_source(), target)
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drkeras.data.samples",
        description="Write a real fundus photograph (scikit-image's retina.jpg, CC0) to a folder.",
    )
    parser.add_argument("--out", required=True, help="folder to write retina.jpg into")
    args = parser.parse_args(argv)
    try:
        path = write_retina(args.out)
    except (FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} (normal left eye, 1411 x 1411; licence: {RETINA_LICENCE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
