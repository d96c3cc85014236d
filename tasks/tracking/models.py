"""MLflow models of fitted parameter models: a pyfunc model per regression run (`model/` in the run's
artifacts), so `mlflow.pyfunc.load_model("runs:/RUN_ID/model")` and `mlflow models serve` predict each
row's natural parameters, mean and quantiles (the `quantiles` param) from its covariates."""

from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from nllflow.models.prediction import FittedModel

ARTIFACT_PATH = "model"
EXAMPLE_QUANTILES = [0.05, 0.5, 0.95]


class ParameterModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a `FittedModel`."""

    def load_context(self, context) -> None:
        self.fitted = FittedModel.load(Path(context.artifacts["fitted"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.fitted.predict(model_input, list((params or {}).get("quantiles") or []))


def requirements() -> list[str]:
    """What a served model needs: this package and the versions it was fitted with (given, so that
    MLflow does not infer them by importing everything)."""
    return [f"{name}=={metadata.version(name)}" for name in ("torch", "mlflow", "pandas", "numpy", "formulaic")]


def save_pyfunc(fitted: FittedModel, example: pd.DataFrame, folder: Path) -> None:
    """The MLflow pyfunc model of `fitted` in `folder`, with a signature of the covariates (from the
    first rows of the training data) and of the predictions."""
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as temporary:
        state = Path(temporary) / "fitted"
        fitted.save(state)
        inputs = example[fitted.covariates].head(5).reset_index(drop=True)
        # whole numbers as doubles: a served model then accepts 3 and 3.5 alike
        inputs = inputs.astype({c: "float64" for c in inputs.columns if pd.api.types.is_integer_dtype(inputs[c])})
        signature = infer_signature(
            inputs, fitted.predict(inputs, EXAMPLE_QUANTILES), params={"quantiles": EXAMPLE_QUANTILES}
        )
        mlflow.pyfunc.save_model(
            path=str(folder),
            python_model=ParameterModel(),
            artifacts={"fitted": str(state)},
            signature=signature,
            pip_requirements=requirements(),
            input_example=inputs,
        )


def predict_run(run_id: str, frame: pd.DataFrame, probabilities: list[float]) -> pd.DataFrame:
    """The predictions of the MLflow model that the regression run `run_id` logged."""
    from mlflow.exceptions import MlflowException

    from nllflow.errors import InputError
    from nllflow.tracking.store import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/{ARTIFACT_PATH}")
    except (MlflowException, OSError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise InputError(
            f"run {run_id} has no model to predict with (only regressions and networks log one): {first}"
        ) from None
    needed = model.metadata.get_input_schema().input_names()
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise InputError(
            f"the data lacks the column(s) {', '.join(missing)} that run {run_id}'s model reads; "
            f"columns: {', '.join(map(str, frame.columns))}"
        )
    return model.predict(frame[needed], params={"quantiles": probabilities})
