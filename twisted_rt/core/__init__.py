"""
The pure core: events, channel names and patterns, configuration, tokens, counters, logging.

It imports only L{twisted_rt.interfaces} (and Twisted, the standard library): no store, web or route.
"""
