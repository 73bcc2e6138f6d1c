"""``zhuge api``: a stateless HTTP service over the scores in Redis, drain plans, and the web page.

Everything it answers is read from Redis at request time (the workers write it),
so any number of replicas can run behind a load balancer; the only thing it
writes is a drain plan it computed (``<prefix>drain:<host>``).

- ``api.reads``: the Redis reads (score hashes, curves, ranks, host sets, fleet counts);
- ``api.plans``: a host's scores and curves -> ``drain.DrainProblem`` -> plan, stored in Redis;
- ``api.service``: the FastAPI app (routes, errors, bearer token, request metrics);
- ``api/static``: the web page (plain JS, Chart.js vendored), served at ``/``.
"""
