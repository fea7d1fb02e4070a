"""Built-in binarizers, one module each; importing this package registers them."""

from . import bireal, biper, clip_ste, dorefa, dsq, fda, fp, irnet, lcr, lqnet, polynomial, rad, rbnn, reactnet, recu, reste, sign_ste, swish_sign, xnor

__all__ = [
    "bireal",
    "biper",
    "clip_ste",
    "dorefa",
    "dsq",
    "fda",
    "fp",
    "irnet",
    "lcr",
    "lqnet",
    "polynomial",
    "rad",
    "rbnn",
    "reactnet",
    "recu",
    "reste",
    "sign_ste",
    "swish_sign",
    "xnor",
]
