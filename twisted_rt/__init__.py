"""
twisted_rt: a Twisted daemon that turns events (signed webhooks, a publish
API) into durable, resumable real-time streams (WebSocket, Server-Sent
Events, long-poll).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
