"""Everything that talks to MLflow: the tracking store and the recorder."""
