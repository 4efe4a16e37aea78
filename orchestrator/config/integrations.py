"""``report_to``: every reporting integration named must be installed where the job runs (issue 13).

transformers only finds out in set-up, on every rank (``RuntimeError: WandbCallback requires wandb
to be installed``); validation says it first, naming the package to install. Only whether the
package can be found is checked (``importlib.util.find_spec``); nothing is imported.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable

# report_to value -> (module transformers imports, what to pip install)
INTEGRATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "wandb": (("wandb",), "wandb"),
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet_ml"),
    "clearml": (("clearml",), "clearml"),
    "neptune": (("neptune",), "neptune"),
    "dvclive": (("dvclive",), "dvclive"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "azure_ml": (("azureml",), "azureml-core"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}
NOTHING = ("none", "all")   # "all": transformers uses whichever are installed


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_report_to(value: Any, installed: Callable[[str], bool] = _installed) -> list[str]:
    """Problems with ``report_to``: unknown integrations and ones whose package is not installed."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if names is None:
        return [f"report_to: expected a name or a list of names, got {type(value).__name__}"]
    problems = []
    for name in (str(n).strip() for n in names):
        if name.lower() in NOTHING or not name:
            continue
        if name not in INTEGRATIONS:
            problems.append(f"report_to: unknown integration {name!r}; known: {', '.join(sorted(INTEGRATIONS))}, "
                            "none, all")
            continue
        modules, package = INTEGRATIONS[name]
        if not any(installed(m) for m in modules):
            problems.append(f"report_to: {name!r} needs the {package} package, which is not installed here "
                            f"(pip install {package}), or set report_to: none")
    return problems
