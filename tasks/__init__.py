"""nllflow: maximum-likelihood fits of probability distributions with autograd, run as Prefect flows
and recorded in MLflow.

The Python API (`nllflow.api`) is loaded on first use, so `import nllflow` stays cheap (no torch,
Prefect or MLflow until a name below is used):

    import nllflow
    fit = nllflow.fit(values, "gamma")
    print(fit.summary())
"""

_API = ("Comparison", "Fit", "Sweep", "compare", "fit", "load_spec", "sweep")
__all__ = list(_API)


def __getattr__(name: str) -> object:
    if name in _API:
        from nllflow import api

        return getattr(api, name)
    raise AttributeError(f"module 'nllflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*(name for name in globals() if name.startswith("__")), *_API})
