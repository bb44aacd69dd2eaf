"""``python -m gateway``: the gRPC gateway on its own (``tokenwire gateway``)."""

from common import settings
from gateway import command

settings.run_part("python -m gateway", command.gateway_flags, command.run)
