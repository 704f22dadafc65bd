"""Every message that crosses the bus, defined once, with one codec per message family.

Both sides import from here, never from each other: the gateway and the actors meet in
these types. Modules by family: `session` (gateway <-> session actors), `model`
(generation requests and results), `memory`, `knowledge`, `router`, `tools`, `leases`,
and `errors` (the error every reply may carry). Only msgspec, `bus` and the event types
of `eventstore` are imported here.
"""
