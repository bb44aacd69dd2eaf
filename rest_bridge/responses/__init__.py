"""OpenAI's Responses API (``/v1/responses``), translated onto the chat RPCs.

A request becomes one ``CreateChatCompletion`` / ``StreamChatCompletion``
call, as llama.cpp's server and LiteLLM do it: ``instructions`` a system
message first, then the conversation of ``previous_response_id``, then the
``input`` items (messages, ``function_call`` items as assistant tool calls,
``function_call_output`` items as tool messages). The chat answer comes back
as ``message`` / ``function_call`` output items; a stream becomes the
``response.*`` event sequence the SDK's ``client.responses.stream`` parses.

Stored responses (``store``, on by default as at OpenAI) live in this bridge
process, in an LRU bounded by count and bytes: the translation happens here and
the gateway's gRPC API has no Responses objects, so keeping the conversation
next to the code that builds it costs no extra hop. ``tokenwire serve`` runs one
bridge per gateway, so that is a store per gateway; several bridges in front
of one gateway each keep their own (route a conversation to one bridge). The
store is lost on restart. Each entry remembers a digest of the API key that
made it, and only that key sees it.

request.py reads a request into the chat body, store.py keeps responses,
output.py builds the response objects, events.py sequences a stream's events,
and routes.py serves them.
"""
