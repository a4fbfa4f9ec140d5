"""Codes shared by the policy model and both scorers (imports nothing of the package).

``loops_sdk.policy`` and ``loops_sdk.scorer`` both import this module, so the scorer needs
nothing from the policy module at run time and imports point one way (policy -> scorer).
"""

from __future__ import annotations

from typing import Final

# Exploration kinds as the kernels number them (core.pxd's KIND_* enum, the twin's KIND_*).
KIND_CODES: Final[dict[str, int]] = {"greedy": 0, "epsilon_greedy": 1, "softmax": 2,
                                     "squarecb": 3, "thompson": 4}
