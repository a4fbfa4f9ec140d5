"""The ``loops`` command (:mod:`.main`) and its demo (:mod:`.demo`)."""

from .main import main

__all__ = ["main"]
