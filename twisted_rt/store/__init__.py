"""
Where events are kept: the SQLite journal, the single-node broker on it, and the Redis broker.

Both brokers implement L{twisted_rt.interfaces.Broker}; they import only the core and the interfaces.
"""
