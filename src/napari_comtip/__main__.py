"""``python -m napari_comtip`` runs the same command line as ``comtip`` (used by torchrun)."""

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
