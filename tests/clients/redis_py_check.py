"""Drives a DistCache node's RESP front end with redis-py 5 over RESP3, as an application would.

    python redis_py_check.py --host 127.0.0.1 --port 6379 [--password secret] [--prefix kv:] \
        [--read-through-key users:42 --read-through-value '{"id":42}']

Each option may come from the environment instead: REDIS_HOST, REDIS_PORT, REDIS_PASSWORD, KEY_PREFIX,
READ_THROUGH_KEY, READ_THROUGH_VALUE. The scratch keys are `<prefix>py-<n>` (the prefix names a cache-aside
keyspace, `kv:`, or is empty for the default keyspace). Checks: the HELLO 3 handshake (redis-py sends it, with
AUTH when a password is given), PING, SET/GET, MGET with a missing key, DEL, EXPIRE/TTL, a pipeline of 100
commands, and a GET that the keyspace's hook answers (read-through). Prints one line per check; exits 1 at the
first mismatch, saying what was expected and what came back.
"""

import argparse
import os
import sys

import redis


def check(what, got, want):
    if got != want:
        sys.exit(f"redis-py: {what}: expected {want!r}, got {got!r}")
    print(f"ok  {what}")


def main():
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default=env("REDIS_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("REDIS_PORT", "6379")))
    p.add_argument("--password", default=env("REDIS_PASSWORD") or None)
    p.add_argument("--prefix", default=env("KEY_PREFIX", ""))
    p.add_argument("--read-through-key", default=env("READ_THROUGH_KEY"))
    p.add_argument("--read-through-value", default=env("READ_THROUGH_VALUE"))
    a = p.parse_args()
    k = lambda name: f"{a.prefix}py-{name}"  # noqa: E731

    r = redis.Redis(host=a.host, port=a.port, password=a.password, protocol=3, decode_responses=True,
                    socket_timeout=10, socket_connect_timeout=5)
    check("PING (after the HELLO 3 handshake)", r.ping(), True)
    hello = r.execute_command("HELLO", "3")
    check("HELLO 3 answers a map with proto 3", (type(hello), hello.get("proto")), (dict, 3))

    check("SET", r.set(k("a"), "alpha"), True)
    check("GET", r.get(k("a")), "alpha")
    check("SET (second key)", r.set(k("b"), "beta"), True)
    r.delete(k("missing"))
    check("MGET", r.mget([k("a"), k("missing"), k("b")]), ["alpha", None, "beta"])
    check("DEL of two keys", r.delete(k("a"), k("b")), 2)
    check("GET after DEL", r.get(k("a")), None)

    check("SET for EXPIRE", r.set(k("ttl"), "soon"), True)
    check("EXPIRE 100", r.expire(k("ttl"), 100), True)
    ttl = r.ttl(k("ttl"))
    check("TTL after EXPIRE 100 within 90..100", 90 <= ttl <= 100, True)
    check("TTL of a missing key", r.ttl(k("missing")), -2)

    pipe = r.pipeline(transaction=False)
    for i in range(50):
        pipe.set(k(f"pipe-{i}"), f"value-{i}")
    for i in range(50):
        pipe.get(k(f"pipe-{i}"))
    replies = pipe.execute()
    check("pipeline of 100: 50 SET replies", replies[:50], [True] * 50)
    check("pipeline of 100: 50 GET replies", replies[50:], [f"value-{i}" for i in range(50)])
    check("DEL of the pipeline's keys", r.delete(*[k(f"pipe-{i}") for i in range(50)]), 50)

    if a.read_through_key:
        check(f"read-through GET {a.read_through_key}", r.get(a.read_through_key), a.read_through_value)
    r.close()
    print("redis-py: all checks passed")


if __name__ == "__main__":
    try:
        main()
    except redis.RedisError as e:
        sys.exit(f"redis-py: {type(e).__name__}: {e}")
