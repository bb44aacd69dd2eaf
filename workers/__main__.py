"""``python -m workers``: one model worker on its own (``tokenwire worker``)."""

from common import settings
from workers import command

settings.run_part("python -m workers", command.worker_flags, command.run)
