"""nnunet-ext: nnU-Net v2 extension trainers (CIML, CAML, ACTION, CFCML).

Importing this package is cheap on purpose: nnU-Net imports trainer modules during its trainer lookup, and
every trainer module imports from here.
"""
from nnunet_ext.version import __version__

__all__ = ["__version__"]
