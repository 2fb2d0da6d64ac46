// Drives a DistCache node's RESP front end with ioredis 5, as a Node.js application would.
//
//   node ioredis_check.js \
//     --host 127.0.0.1 --port 6379 [--password secret] [--prefix kv:] \
//     [--read-through-key users:42 --read-through-value '{"id":42}']
//
// Each option may come from the environment instead: REDIS_HOST, REDIS_PORT, REDIS_PASSWORD, KEY_PREFIX,
// READ_THROUGH_KEY, READ_THROUGH_VALUE. ioredis is loaded from NODE_PATH, else from the npm prefix that
// `make setup` fills: $DISTCACHE_CLIENTS_DIR/node (default /var/cache/distcache/clients/node). ioredis speaks RESP2 and sends no HELLO: on connect it sends AUTH <password>
// (when given), CLIENT SETINFO LIB-VER and LIB-NAME (errors ignored), then INFO, its ready check, which must answer
// a bulk string whose `loading:` field is absent or 0. The checks: that handshake, PING, HELLO 2, SET/GET, MGET with
// a missing key, DEL, EXPIRE/TTL, a pipeline of 100 commands, and a GET that the keyspace's hook answers
// (read-through). Prints one line per check; exits 1 at the first mismatch, saying what was expected and what came
// back.
"use strict";

const { parseArgs } = require("node:util");
const { isDeepStrictEqual } = require("node:util");
const Redis = loadIoredis();

function loadIoredis() {
  const dir = `${process.env.DISTCACHE_CLIENTS_DIR || "/var/cache/distcache/clients"}/node/node_modules`;
  for (const name of ["ioredis", `${dir}/ioredis`]) {
    try {
      return require(name);
    } catch (e) {
      if (e.code !== "MODULE_NOT_FOUND") throw e;
    }
  }
  console.error(`ioredis: the ioredis package is neither on NODE_PATH nor in ${dir}: run make setup`);
  process.exit(2);
}

const env = process.env;
const { values: a } = parseArgs({
  options: {
    host: { type: "string", default: env.REDIS_HOST || "127.0.0.1" },
    port: { type: "string", default: env.REDIS_PORT || "6379" },
    password: { type: "string", default: env.REDIS_PASSWORD || "" },
    prefix: { type: "string", default: env.KEY_PREFIX || "" },
    "read-through-key": { type: "string", default: env.READ_THROUGH_KEY || "" },
    "read-through-value": { type: "string", default: env.READ_THROUGH_VALUE || "" },
  },
});
const k = (name) => `${a.prefix}js-${name}`;
let firstError = null;

function check(what, got, want) {
  if (!isDeepStrictEqual(got, want)) {
    console.error(`ioredis: ${what}: expected ${JSON.stringify(want)}, got ${JSON.stringify(got)}`);
    process.exit(1);
  }
  console.log(`ok  ${what}`);
}

async function main() {
  const r = new Redis({
    host: a.host,
    port: Number(a.port),
    password: a.password || undefined,
    lazyConnect: true,
    connectTimeout: 5000,
    commandTimeout: 10000,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null, // a failed connection is an error here, not something to retry
  });
  // A failed handshake closes the connection and rejects connect() with only "Connection is closed": keep the
  // error that caused it (such as WRONGPASS from AUTH) for the message.
  r.on("error", (e) => (firstError ??= e));
  await r.connect(); // resolves once the ready check (INFO) passed
  check("connected and ready (AUTH, CLIENT SETINFO, INFO)", r.status, "ready");
  check("PING", await r.ping(), "PONG");
  const hello = await r.call("HELLO", "2");
  const fields = Object.fromEntries(hello.flatMap((v, i) => (i % 2 ? [] : [[v, hello[i + 1]]])));
  check("HELLO 2 answers a flat array with proto 2", fields.proto, 2);

  check("SET", await r.set(k("a"), "alpha"), "OK");
  check("GET", await r.get(k("a")), "alpha");
  check("SET (second key)", await r.set(k("b"), "beta"), "OK");
  await r.del(k("missing"));
  check("MGET", await r.mget(k("a"), k("missing"), k("b")), ["alpha", null, "beta"]);
  check("DEL of two keys", await r.del(k("a"), k("b")), 2);
  check("GET after DEL", await r.get(k("a")), null);

  check("SET for EXPIRE", await r.set(k("ttl"), "soon"), "OK");
  check("EXPIRE 100", await r.expire(k("ttl"), 100), 1);
  const ttl = await r.ttl(k("ttl"));
  check("TTL after EXPIRE 100 within 90..100", ttl >= 90 && ttl <= 100, true);
  check("TTL of a missing key", await r.ttl(k("missing")), -2);

  const pipe = r.pipeline();
  for (let i = 0; i < 50; i++) pipe.set(k(`pipe-${i}`), `value-${i}`);
  for (let i = 0; i < 50; i++) pipe.get(k(`pipe-${i}`));
  const replies = await pipe.exec(); // [[error, reply], ...]
  check("pipeline of 100: no error", replies.filter(([e]) => e).map(([e]) => e.message), []);
  check("pipeline of 100: 50 SET replies", replies.slice(0, 50).map(([, v]) => v), Array(50).fill("OK"));
  check(
    "pipeline of 100: 50 GET replies",
    replies.slice(50).map(([, v]) => v),
    Array.from({ length: 50 }, (_, i) => `value-${i}`),
  );
  check("DEL of the pipeline's keys", await r.del(...Array.from({ length: 50 }, (_, i) => k(`pipe-${i}`))), 50);

  const key = a["read-through-key"];
  if (key) check(`read-through GET ${key}`, await r.get(key), a["read-through-value"]);
  await r.quit();
  console.log("ioredis: all checks passed");
}

main().catch((e) => {
  const cause = firstError && firstError !== e ? ` (first error: ${firstError.name}: ${firstError.message})` : "";
  console.error(`ioredis: ${e.name}: ${e.message}${cause}`);
  process.exit(1);
});
