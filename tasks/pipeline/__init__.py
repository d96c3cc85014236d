"""From specs to fits: the pipeline steps as plain functions (steps) and their Prefect task
wrappers (prefect_tasks)."""
