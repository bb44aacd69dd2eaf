"""``python -m rest_bridge``: the OpenAI REST + SSE bridge on its own (``tokenwire bridge``)."""

from common import settings
from rest_bridge import command

settings.run_part("python -m rest_bridge", command.bridge_flags, command.run)
