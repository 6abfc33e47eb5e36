"""The Celery app of scripts/peers: no-op tasks, every setting at Celery's default.

The broker and result backend come from the environment (run.sh sets them):
PEERS_CELERY_BROKER (an amqp:// URL to a vhost of its own) and PEERS_CELERY_BACKEND
(a db+postgresql+psycopg2:// URL to a scratch database).
"""

import os

from celery import Celery

app = Celery(
    "peers",
    broker=os.environ["PEERS_CELERY_BROKER"],
    backend=os.environ["PEERS_CELERY_BACKEND"],
)
# Nothing else is configured: task_acks_late=False (a message is acked just before its
# task starts), worker_prefetch_multiplier=4, the prefork pool with one process per
# core, persistent messages (delivery_mode 2) on durable queues, no publisher confirms.


@app.task(name="peers.echo")
def echo(n):
    """The no-op task: returns its argument, like taskmill.echo."""
    return n


@app.task(name="peers.done")
def done(results):
    """The no-op chord callback: it gets the header's results and drops them."""
    return None
