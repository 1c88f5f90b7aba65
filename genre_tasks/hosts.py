"""The name a worker reports to Airflow (``[core] hostname_callable``).

Airflow records on every task instance the host name of the worker that ran it, from
``socket.getfqdn()`` by default: two Celery workers on one machine would both report that
machine. Point Airflow at this function and give each worker its own ``$GENRE_WORKER_HOSTNAME``::

    AIRFLOW__CORE__HOSTNAME_CALLABLE=genre_tasks.hosts.worker_hostname
    GENRE_WORKER_HOSTNAME=worker-a

Without the variable it is Airflow's own default (the FQDN). Standard library only: Airflow
imports it in the worker's supervisor process.
"""
from __future__ import annotations

import os
import socket

HOSTNAME_ENV = "GENRE_WORKER_HOSTNAME"


def worker_hostname() -> str:
    """``$GENRE_WORKER_HOSTNAME``, else ``socket.getfqdn()``."""
    return os.environ.get(HOSTNAME_ENV, "").strip() or socket.getfqdn()
