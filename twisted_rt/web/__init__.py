"""
The HTTP layer every route shares: JSON errors and the resource bridge (L{resource}), the Site and its
request/channel (L{site}), TLS (L{tls}).  Nothing here knows a route.
"""
