"""One client per server per process, shared by every capability that talks to it.

The cache (L2 and its invalidation channel) and the rate limiter both speak to
Redis; the event log and the realtime broker both speak to NATS. Each used to
open its own connections: twice the sockets on the server, twice the
reconnect storms, and no single place that knows a server is down. Here a
capability *acquires* the client for a URL and *releases* it when it closes;
the first acquire opens it, the last release closes it::

    from tenfold.clients.redis import redis_clients
    client = redis_clients.acquire(url)        # RespClient + lazy pub/sub, shared
    ...
    await redis_clients.release(client)

    from tenfold.clients.nats import nats_clients
    nats = await nats_clients.acquire(url)     # one nats-py connection, shared
    ...
    await nats_clients.release(nats)

Clients are per event loop as well as per URL (a connection belongs to the loop
that opened it), which in a server process means per process. Import the
module you need: each needs its own optional extra, so this package imports
neither.
"""
