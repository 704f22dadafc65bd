"""The HTTP edge: the gateway's package (`gateway.py` is its face).

Doors (chat completions, models, sessions, admin), OpenAI's wire format, SSE, auth,
cross-site rules, connection limits. It speaks to the actors only through `contracts`
over `bus`; it imports no actor.
"""
