"""The scorer: the compiled core (``core``, built from core.pyx and its .pxi files) and its
bit-identical pure-Python twin (``twin``).

Nothing is imported here: ``loops_sdk.scorer`` chooses one of the two (``LOOPS_PURE_PYTHON=1``
selects the twin), so the twin works where the extension is not built.
"""
