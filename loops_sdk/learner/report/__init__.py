"""The learner's HTML report (:mod:`.report`) and its SVG charts (:mod:`.charts`)."""

from .report import write_report

__all__ = ["write_report"]
