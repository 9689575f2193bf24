"""``python -m gpugroups notebooks [DIR]``: copy the notebooks that come with gpugroups into DIR.

A pip install has no checkout to open ``notebooks/quickstart.ipynb`` from: the wheel carries the
notebooks inside the package (``gpugroups/notebooks``), and this command puts copies where the
user works, never over a file that is there already, then says how to open them. From a checkout
(an editable install) it copies the checkout's ``notebooks/``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

#: Where the notebooks are: inside the installed package, else beside it in a checkout.
SHIPPED = (Path(__file__).parent / "notebooks", Path(__file__).parents[1] / "notebooks")


def shipped_notebooks() -> list[Path]:
    """The notebooks that come with this install."""
    for folder in SHIPPED:
        found = sorted(folder.glob("*.ipynb"))
        if found:
            return found
    raise FileNotFoundError("no notebooks come with this install of gpugroups")


def copy_notebooks(dest: Path) -> tuple[list[Path], list[Path]]:
    """Copy the shipped notebooks into ``dest`` (made if needed): the copies made, and the files
    kept because ``dest`` had them already."""
    dest.mkdir(parents=True, exist_ok=True)
    made, kept = [], []
    for nb in shipped_notebooks():
        target = dest / nb.name
        if target.exists():
            kept.append(target)
        else:
            shutil.copyfile(nb, target)
            made.append(target)
    return made, kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpugroups", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    nbs = commands.add_parser("notebooks", help="copy the shipped notebooks (quickstart, research, ...) into DIR")
    nbs.add_argument("dir", nargs="?", default="gpugroups-notebooks", help="where (default: ./gpugroups-notebooks)")
    args = parser.parse_args(argv)
    dest = Path(args.dir)
    try:
        made, kept = copy_notebooks(dest)
    except OSError as exc:
        print(f"cannot copy the notebooks into {dest}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for path in made:
        print(f"copied  {path}")
    for path in kept:
        print(f"kept    {path} (it was there already)")
    print(f"\nopen them with:  jupyter lab {dest / 'quickstart.ipynb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
