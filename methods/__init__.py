"""Built-in binarizers, one module each; importing this package registers them."""

from . import biper, clip_ste, fp, polynomial, recu, reste, sign_ste

__all__ = ["biper", "clip_ste", "fp", "polynomial", "recu", "reste", "sign_ste"]
