"""The time-series modality on XTuner V1: tokenize function, sequence context, collator, model, trainer config.

Only this package (with train.py and merge.py for ms-swift) knows a trainer.
"""

from __future__ import annotations

import importlib

XTUNER_COMMIT = "b934f462095c1e750229de35367c50ae36caa786"
XTUNER_INSTALL = (
    f'pip install --no-deps "xtuner @ git+https://github.com/InternLM/xtuner@{XTUNER_COMMIT}" '
    "(offline: pip install --no-deps <wheel built from that commit>), plus requirements.txt for the modules it imports"
)


def require_xtuner() -> None:
    """Stop with what to install when XTuner V1 or a module it imports is missing."""
    try:
        importlib.import_module("xtuner.v1")
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing and not missing.startswith("xtuner"):
            raise RuntimeError(f"XTuner V1 imports {missing!r}, which is not installed: pip install -r requirements.txt ({exc})") from exc
        try:
            importlib.import_module("xtuner")
            found = "the installed xtuner has no xtuner.v1 (PyPI's xtuner 0.2.0 is the older mmengine tool)"
        except ImportError:
            found = "xtuner is not installed"
        raise RuntimeError(f"the time-series stages need XTuner V1, but {found}; install it with {XTUNER_INSTALL}") from exc
