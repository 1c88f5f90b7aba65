"""Airflow glue of genre-mlops that Airflow's own processes import by class path (the triggerer
imports an asset watcher's trigger from here, not from the DAG folder). Light: the standard
library and ``airflow.triggers`` only; the pipeline logic stays in ``genre_tasks``."""
