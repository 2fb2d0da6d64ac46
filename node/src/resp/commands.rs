//! The commands. Errors use Redis's exact wording where clients match on it (unknown command, wrong number of
//! arguments, NOAUTH, WRONGPASS, NOPROTO, syntax error, cluster support disabled).
//!
//! Reads (GET, MGET, EXISTS, TTL, PTTL, TYPE) are read-through, like the gRPC Get: a key the cache does not hold
//! is loaded from its keyspace's data source at the key's owner, so these commands see what GET sees. Writes
//! (SET, SETEX, MSET, DEL, UNLINK, EXPIRE) are the gRPC Put and Delete. The conditional forms (SET NX/XX/GET/
//! KEEPTTL, EXPIRE) read the key first and then write it: two steps, so a concurrent writer of the same key can
//! come between them (they are not a lock primitive).

use std::{
    fmt::Write as _,
    ops::Range,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use distcache_api::AccessOp;

use super::{Shared, reply::Out};
use crate::{
    error::{Code, EngineError},
    keyspace::{KeyspaceRuntime, Value},
    peer::WriteEntry,
};

/// Whether the connection goes on after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmd {
    Get,
    Set,
    SetEx,
    MGet,
    MSet,
    Del,
    Unlink,
    Exists,
    Expire,
    PExpire,
    Ttl,
    PTtl,
    Type,
    Ping,
    Echo,
    Quit,
    Auth,
    Hello,
    Select,
    Client,
    Command,
    Info,
    Config,
    DbSize,
    Cluster,
}

/// A command as `COMMAND` describes it: name, arity (negative: at least), flags, first/last key and step.
struct Spec {
    cmd: Cmd,
    name: &'static str,
    arity: i64,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
}

const READ: &[&str] = &["readonly", "fast"];
const WRITE: &[&str] = &["write", "denyoom"];
const CONN: &[&str] = &["fast", "loading", "stale"];

/// Every command, GET first (the hot path looks it up first).
const COMMANDS: &[Spec] = &[
    Spec { cmd: Cmd::Get, name: "get", arity: 2, flags: READ, keys: (1, 1, 1) },
    Spec { cmd: Cmd::Set, name: "set", arity: -3, flags: WRITE, keys: (1, 1, 1) },
    Spec { cmd: Cmd::MGet, name: "mget", arity: -2, flags: READ, keys: (1, -1, 1) },
    Spec { cmd: Cmd::MSet, name: "mset", arity: -3, flags: WRITE, keys: (1, -1, 2) },
    Spec { cmd: Cmd::Del, name: "del", arity: -2, flags: &["write"], keys: (1, -1, 1) },
    Spec { cmd: Cmd::Unlink, name: "unlink", arity: -2, flags: &["write", "fast"], keys: (1, -1, 1) },
    Spec { cmd: Cmd::SetEx, name: "setex", arity: 4, flags: WRITE, keys: (1, 1, 1) },
    Spec { cmd: Cmd::Exists, name: "exists", arity: -2, flags: READ, keys: (1, -1, 1) },
    Spec { cmd: Cmd::Expire, name: "expire", arity: -3, flags: &["write", "fast"], keys: (1, 1, 1) },
    Spec { cmd: Cmd::PExpire, name: "pexpire", arity: -3, flags: &["write", "fast"], keys: (1, 1, 1) },
    Spec { cmd: Cmd::Ttl, name: "ttl", arity: 2, flags: READ, keys: (1, 1, 1) },
    Spec { cmd: Cmd::PTtl, name: "pttl", arity: 2, flags: READ, keys: (1, 1, 1) },
    Spec { cmd: Cmd::Type, name: "type", arity: 2, flags: READ, keys: (1, 1, 1) },
    Spec { cmd: Cmd::Ping, name: "ping", arity: -1, flags: &["fast", "stale"], keys: (0, 0, 0) },
    Spec { cmd: Cmd::Echo, name: "echo", arity: 2, flags: &["fast"], keys: (0, 0, 0) },
    Spec { cmd: Cmd::Quit, name: "quit", arity: -1, flags: CONN, keys: (0, 0, 0) },
    Spec {
        cmd: Cmd::Auth,
        name: "auth",
        arity: -2,
        flags: &["noscript", "loading", "stale", "fast", "no_auth"],
        keys: (0, 0, 0),
    },
    Spec {
        cmd: Cmd::Hello,
        name: "hello",
        arity: -1,
        flags: &["noscript", "loading", "stale", "fast", "no_auth"],
        keys: (0, 0, 0),
    },
    Spec { cmd: Cmd::Select, name: "select", arity: 2, flags: CONN, keys: (0, 0, 0) },
    Spec { cmd: Cmd::Client, name: "client", arity: -2, flags: &[], keys: (0, 0, 0) },
    Spec { cmd: Cmd::Command, name: "command", arity: -1, flags: &["loading", "stale"], keys: (0, 0, 0) },
    Spec { cmd: Cmd::Info, name: "info", arity: -1, flags: &["loading", "stale"], keys: (0, 0, 0) },
    Spec { cmd: Cmd::Config, name: "config", arity: -2, flags: &[], keys: (0, 0, 0) },
    Spec { cmd: Cmd::DbSize, name: "dbsize", arity: 1, flags: &["readonly", "fast"], keys: (0, 0, 0) },
    Spec { cmd: Cmd::Cluster, name: "cluster", arity: -2, flags: &[], keys: (0, 0, 0) },
];

fn lookup(name: &[u8]) -> Option<&'static Spec> {
    COMMANDS.iter().find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Redis's wording for an unknown command: the name and the first arguments, quoted.
fn unknown_command(frame: &[u8], args: &[Range<usize>]) -> String {
    let name = String::from_utf8_lossy(&frame[args[0].clone()]);
    let name: String = name.chars().take(128).collect();
    let mut listed = String::new();
    for a in &args[1..] {
        if listed.len() >= 128 {
            break;
        }
        let text = String::from_utf8_lossy(&frame[a.clone()]);
        let room = 128 - listed.len();
        let _ = write!(listed, "'{}' ", text.chars().take(room).collect::<String>());
    }
    format!("ERR unknown command '{name}', with args beginning with: {listed}")
}

fn wrong_arity(name: &str) -> String {
    format!("ERR wrong number of arguments for '{name}' command")
}

const SYNTAX: &str = "ERR syntax error";
const NOT_INTEGER: &str = "ERR value is not an integer or out of range";

/// The reply text of an engine error.
fn error_text(e: &EngineError) -> String {
    match e.code() {
        Code::PermissionDenied => format!("NOPERM {e}"),
        _ => format!("ERR {e}"),
    }
}

fn integer(raw: &[u8]) -> Option<i64> {
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// Milliseconds since the Unix epoch, now.
fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// When a written key expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    /// In this long.
    In(Duration),
    /// Already (EXAT/PXAT in the past): the key is deleted.
    Past,
}

/// An expiry from a relative or absolute time in seconds or milliseconds, as SET's and EXPIRE's options give it.
fn expiry(raw: &[u8], unit_ms: i64, absolute: bool, command: &str) -> Result<Expiry, String> {
    let n = integer(raw).ok_or_else(|| NOT_INTEGER.to_owned())?;
    let invalid = || format!("ERR invalid expire time in '{command}' command");
    let ms = n.checked_mul(unit_ms).ok_or_else(invalid)?;
    let ms = if absolute { ms - now_unix_ms() } else { ms };
    if ms <= 0 {
        return if absolute || command == "expire" || command == "pexpire" {
            Ok(Expiry::Past)
        } else {
            Err(invalid())
        };
    }
    Ok(Expiry::In(Duration::from_millis(u64::try_from(ms).map_err(|_| invalid())?)))
}

/// Keys of one keyspace in a multi-key command: the keyspace, the keys' positions in the command, the keys.
type Group = (Arc<KeyspaceRuntime>, Vec<usize>, Vec<String>);

/// The per-connection state.
pub(super) struct Session {
    shared: Arc<Shared>,
    id: u64,
    name: Option<String>,
    lib: (Option<String>, Option<String>),
    authed: bool,
    /// The identities the keyspaces' `access` lists see: the AUTH user (none for `default`).
    identities: Vec<String>,
}

impl Session {
    pub(super) fn new(shared: &Arc<Shared>) -> Self {
        Self {
            shared: Arc::clone(shared),
            id: shared.next_id.fetch_add(1, Ordering::Relaxed),
            name: None,
            lib: (None, None),
            authed: !shared.auth.required(),
            identities: Vec::new(),
        }
    }

    /// Runs a command that needs no await and writes its reply; `None` for a command that must await (a miss, a
    /// write, a batch), to be run by [`Session::run_async`].
    pub(super) fn run_sync(&mut self, frame: &[u8], args: &[Range<usize>], out: &mut Out) -> Option<Flow> {
        let a = |i: usize| &frame[args[i].clone()];
        let Some(spec) = lookup(a(0)) else {
            out.error(&unknown_command(frame, args));
            return Some(Flow::Continue);
        };
        self.shared.engine.metrics().resp_commands.inc();
        let n = i64::try_from(args.len()).unwrap_or(i64::MAX);
        if (spec.arity > 0 && n != spec.arity) || (spec.arity < 0 && n < -spec.arity) {
            out.error(&wrong_arity(spec.name));
            return Some(Flow::Continue);
        }
        if !self.authed && !matches!(spec.cmd, Cmd::Auth | Cmd::Hello | Cmd::Quit) {
            out.error("NOAUTH Authentication required.");
            return Some(Flow::Continue);
        }
        match spec.cmd {
            Cmd::Get => {
                let (ks, key) = match self.resolve(a(1), "get", AccessOp::Read) {
                    Ok(pair) => pair,
                    Err(message) => {
                        out.error(&message);
                        return Some(Flow::Continue);
                    }
                };
                let hit = self.shared.engine.get_cached(&ks, key)?;
                match hit.value() {
                    Some(value) => out.bulk(value),
                    None => out.null(),
                }
            }
            Cmd::Ping => match args.len() {
                1 => out.simple("PONG"),
                2 => out.bulk(a(1)),
                _ => out.error(&wrong_arity("ping")),
            },
            Cmd::Echo => out.bulk(a(1)),
            Cmd::Quit => {
                out.ok();
                return Some(Flow::Close);
            }
            Cmd::Auth => self.auth(frame, args, out),
            Cmd::Hello => self.hello(frame, args, out),
            Cmd::Select => match integer(a(1)) {
                Some(0) => out.ok(),
                Some(_) => out.error("ERR DB index is out of range"),
                None => out.error(NOT_INTEGER),
            },
            Cmd::Client => self.client(frame, args, out),
            Cmd::Command => command(frame, args, out),
            Cmd::Info => self.info(frame, args, out),
            Cmd::Config => self.config(frame, args, out),
            Cmd::DbSize => {
                // Like Redis's, the count includes expired entries not reclaimed yet (a scrape of `/metrics`
                // reclaims them).
                let keyspaces = self.shared.engine.keyspaces().all();
                let entries: u64 = keyspaces.iter().map(|ks| ks.store.entries()).sum();
                out.int(i64::try_from(entries).unwrap_or(i64::MAX));
            }
            Cmd::Cluster => out.error("ERR This instance has cluster support disabled"),
            Cmd::Set
            | Cmd::SetEx
            | Cmd::MGet
            | Cmd::MSet
            | Cmd::Del
            | Cmd::Unlink
            | Cmd::Exists
            | Cmd::Expire
            | Cmd::PExpire
            | Cmd::Ttl
            | Cmd::PTtl
            | Cmd::Type => return None,
        }
        Some(Flow::Continue)
    }

    /// Runs a command that awaits (after [`Session::run_sync`] declined it: the checks there passed).
    pub(super) async fn run_async(&mut self, frame: &[u8], args: &[Range<usize>], out: &mut Out) -> Flow {
        let a = |i: usize| &frame[args[i].clone()];
        let Some(spec) = lookup(a(0)) else { return Flow::Continue };
        let keys = || args[1..].iter().map(|r| &frame[r.clone()]);
        let done = match spec.cmd {
            Cmd::Get => self.read(a(1)).await.map(|v| reply_option(out, v.as_ref())),
            Cmd::Set => self.set(frame, args, out).await,
            Cmd::SetEx => match expiry(a(2), 1000, false, "setex") {
                Ok(Expiry::In(ttl)) => self.write(a(1), a(3), Some(ttl)).await.map(|()| out.ok()),
                Ok(Expiry::Past) => Err("ERR invalid expire time in 'setex' command".to_owned()),
                Err(message) => Err(message),
            },
            Cmd::MGet => self.read_many(keys()).await.map(|values| {
                out.array(values.len());
                for v in &values {
                    reply_option(out, v.as_ref());
                }
            }),
            Cmd::Exists => self.read_many(keys()).await.map(|values| {
                out.int(i64::try_from(values.iter().filter(|v| v.is_some()).count()).unwrap_or(i64::MAX));
            }),
            Cmd::MSet => self.mset(frame, args).await.map(|()| out.ok()),
            Cmd::Del | Cmd::Unlink => self.delete_many(keys()).await.map(|n| out.int(n)),
            Cmd::Expire => self.expire(frame, args, 1000, "expire").await.map(|n| out.int(n)),
            Cmd::PExpire => self.expire(frame, args, 1, "pexpire").await.map(|n| out.int(n)),
            Cmd::Ttl | Cmd::PTtl => self.read(a(1)).await.map(|v| {
                let ms = spec.cmd == Cmd::PTtl;
                out.int(match v {
                    None => -2,
                    Some(Value { ttl: None, .. }) => -1,
                    Some(Value { ttl: Some(left), .. }) if ms => {
                        i64::try_from(left.as_millis()).unwrap_or(i64::MAX)
                    }
                    Some(Value { ttl: Some(left), .. }) => {
                        i64::try_from((left.as_millis() + 500) / 1000).unwrap_or(i64::MAX)
                    }
                });
            }),
            Cmd::Type => {
                self.read(a(1)).await.map(|v| out.simple(if v.is_some() { "string" } else { "none" }))
            }
            _ => Ok(()),
        };
        if let Err(message) = done {
            out.error(&message);
        }
        Flow::Continue
    }

    /// GETs of a pipeline, in order, the first of which must load (so [`Session::run_sync`] declined it and
    /// counted it): each key is answered from memory when it can be, the others load in one batch per keyspace.
    /// Each GET gets its own reply (a value, nil or its error), in the order of the commands.
    pub(super) async fn get_run(&mut self, buf: &[u8], keys: &[Range<usize>], out: &mut Out) {
        let engine = &self.shared.engine;
        engine.metrics().resp_commands.inc_by(keys.len().saturating_sub(1) as u64);
        let mut answers: Vec<Option<Result<Option<Value>, String>>> = vec![None; keys.len()];
        let mut groups: Vec<Group> = Vec::new();
        for (i, range) in keys.iter().enumerate() {
            let (ks, key) = match self.resolve(&buf[range.clone()], "get", AccessOp::Read) {
                Ok(pair) => pair,
                Err(message) => {
                    answers[i] = Some(Err(message));
                    continue;
                }
            };
            match engine.get_cached(&ks, key) {
                Some(hit) => answers[i] = Some(answer(hit.into_value())),
                None => add_to_group(&mut groups, ks, i, key),
            }
        }
        for (ks, positions, names) in groups {
            match engine.get_many(ks.name(), &names).await {
                Ok(results) => {
                    for (i, result) in positions.into_iter().zip(results) {
                        answers[i] = Some(answer(result));
                    }
                }
                Err(e) => {
                    let message = error_text(&e);
                    for i in positions {
                        answers[i] = Some(Err(message.clone()));
                    }
                }
            }
        }
        for answer in answers {
            match answer {
                Some(Ok(v)) => reply_option(out, v.as_ref()),
                Some(Err(message)) => out.error(&message),
                None => out.error("ERR internal: a GET of the pipeline got no answer"),
            }
        }
    }

    /// The keyspace and key of a RESP key, checked against the keyspace's `access` lists for `op`.
    fn resolve<'k>(
        &self,
        raw: &'k [u8],
        op: &'static str,
        access: AccessOp,
    ) -> Result<(Arc<KeyspaceRuntime>, &'k str), String> {
        let key = std::str::from_utf8(raw)
            .map_err(|_| "ERR key is not valid UTF-8 (DistCache keys are text)".to_owned())?;
        let keyspaces = self.shared.engine.keyspaces();
        let prefixed =
            key.split_once(':').and_then(|(prefix, rest)| keyspaces.get(prefix).map(|ks| (ks, rest)));
        let (ks, key) = if let Some(found) = prefixed {
            found
        } else if let Some(name) = &self.shared.default_keyspace {
            let ks = keyspaces.get(name).ok_or_else(|| {
                format!(
                    "ERR resp.defaultKeyspace {name:?} is not a keyspace of this node (known: {})",
                    keyspaces.names()
                )
            })?;
            (ks, key)
        } else {
            let shown: String = key.chars().take(64).collect();
            return Err(format!(
                "ERR key {shown:?} names no keyspace: write KEYSPACE:KEY with one of ({}), or set resp.defaultKeyspace",
                keyspaces.names()
            ));
        };
        let anonymous = "not authenticated as a user: AUTH as one the keyspace's access lists name";
        self.shared
            .engine
            .authorize_as(ks.name(), op, access, &self.identities, anonymous)
            .map_err(|e| error_text(&e))?;
        Ok((ks, key))
    }

    /// A read-through read of one key: `None` when it has no value.
    async fn read(&self, raw: &[u8]) -> Result<Option<Value>, String> {
        let (ks, key) = self.resolve(raw, "get", AccessOp::Read)?;
        answer(self.shared.engine.get(ks.name(), key).await)
    }

    /// A write of one key (`ttl` none: the keyspace's default).
    async fn write(&self, raw: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<(), String> {
        let (ks, key) = self.resolve(raw, "put", AccessOp::Write)?;
        self.shared
            .engine
            .put(ks.name(), key, Bytes::copy_from_slice(value), ttl)
            .await
            .map_err(|e| error_text(&e))
    }

    /// Keys grouped by keyspace, with their positions, in first-seen order (usually one group).
    fn group<'k>(
        &self,
        keys: impl Iterator<Item = &'k [u8]>,
        op: &'static str,
        access: AccessOp,
    ) -> Result<(usize, Vec<Group>), String> {
        let mut groups: Vec<Group> = Vec::new();
        let mut n = 0;
        for (i, raw) in keys.enumerate() {
            let (ks, key) = self.resolve(raw, op, access)?;
            add_to_group(&mut groups, ks, i, key);
            n = i + 1;
        }
        Ok((n, groups))
    }

    /// Read-through reads of keys, one batch per keyspace (one peer call per owner). Any error but "no value"
    /// fails the whole command: a nil must mean "no value", never "could not tell".
    async fn read_many<'k>(
        &self,
        keys: impl Iterator<Item = &'k [u8]>,
    ) -> Result<Vec<Option<Value>>, String> {
        let (n, groups) = self.group(keys, "get_many", AccessOp::Read)?;
        let mut values = vec![None; n];
        for (ks, positions, keys) in groups {
            let results = self.shared.engine.get_many(ks.name(), &keys).await.map_err(|e| error_text(&e))?;
            for (position, result) in positions.into_iter().zip(results) {
                values[position] = answer(result)?;
            }
        }
        Ok(values)
    }

    /// Deletes keys, one batch per keyspace; the number of keys given (each is absent afterwards).
    async fn delete_many<'k>(&self, keys: impl Iterator<Item = &'k [u8]>) -> Result<i64, String> {
        let (n, groups) = self.group(keys, "delete_many", AccessOp::Write)?;
        for (ks, _, keys) in groups {
            let results =
                self.shared.engine.delete_many(ks.name(), &keys).await.map_err(|e| error_text(&e))?;
            if let Some(e) = results.into_iter().find_map(Result::err) {
                return Err(error_text(&e));
            }
        }
        Ok(i64::try_from(n).unwrap_or(i64::MAX))
    }

    async fn mset(&self, frame: &[u8], args: &[Range<usize>]) -> Result<(), String> {
        if args.len().is_multiple_of(2) {
            return Err(wrong_arity("mset"));
        }
        let pairs: Vec<(&[u8], &[u8])> =
            args[1..].chunks(2).map(|p| (&frame[p[0].clone()], &frame[p[1].clone()])).collect();
        let (_, groups) = self.group(pairs.iter().map(|p| p.0), "put_many", AccessOp::Write)?;
        for (ks, positions, keys) in groups {
            let entries = positions
                .into_iter()
                .zip(keys)
                .map(|(i, key)| WriteEntry {
                    key: Arc::from(key),
                    value: Bytes::copy_from_slice(pairs[i].1),
                    ttl: None,
                })
                .collect();
            let results =
                self.shared.engine.put_many(ks.name(), entries).await.map_err(|e| error_text(&e))?;
            if let Some(e) = results.into_iter().find_map(Result::err) {
                return Err(error_text(&e));
            }
        }
        Ok(())
    }

    /// SET key value [NX|XX] [GET] [EX s|PX ms|EXAT ts|PXAT ms-ts|KEEPTTL].
    async fn set(&self, frame: &[u8], args: &[Range<usize>], out: &mut Out) -> Result<(), String> {
        let a = |i: usize| &frame[args[i].clone()];
        let (mut nx, mut xx, mut get, mut keep) = (false, false, false, false);
        let mut ttl: Option<Expiry> = None;
        let mut i = 3;
        while i < args.len() {
            let opt = a(i);
            let is = |name: &str| opt.eq_ignore_ascii_case(name.as_bytes());
            if is("NX") && !xx {
                nx = true;
            } else if is("XX") && !nx {
                xx = true;
            } else if is("GET") {
                get = true;
            } else if is("KEEPTTL") && ttl.is_none() {
                keep = true;
            } else if ttl.is_none() && !keep && (is("EX") || is("PX") || is("EXAT") || is("PXAT")) {
                let Some(value) = args.get(i + 1).map(|r| &frame[r.clone()]) else {
                    return Err(SYNTAX.into());
                };
                let unit = if is("EX") || is("EXAT") { 1000 } else { 1 };
                ttl = Some(expiry(value, unit, is("EXAT") || is("PXAT"), "set")?);
                i += 1;
            } else {
                return Err(SYNTAX.into());
            }
            i += 1;
        }
        let old = if nx || xx || get || keep { self.read(a(1)).await? } else { None };
        let reply_old = |out: &mut Out| reply_option(out, old.as_ref());
        if (nx && old.is_some()) || (xx && old.is_none()) {
            if get {
                reply_old(out);
            } else {
                out.null();
            }
            return Ok(());
        }
        let ttl = match (ttl, keep) {
            (Some(Expiry::In(d)), _) => Some(d),
            (Some(Expiry::Past), _) => {
                self.remove(a(1)).await?;
                if get {
                    reply_old(out);
                } else {
                    out.ok();
                }
                return Ok(());
            }
            // KEEPTTL of a stale value (no time left) or of no value: the keyspace's default.
            (None, true) => old.as_ref().and_then(|v| v.ttl).filter(|d| !d.is_zero()),
            (None, false) => None,
        };
        self.write(a(1), a(2), ttl).await?;
        if get {
            reply_old(out);
        } else {
            out.ok();
        }
        Ok(())
    }

    async fn remove(&self, raw: &[u8]) -> Result<(), String> {
        let (ks, key) = self.resolve(raw, "delete", AccessOp::Write)?;
        self.shared.engine.delete(ks.name(), key).await.map_err(|e| error_text(&e))
    }

    /// EXPIRE / PEXPIRE key n [NX|XX|GT|LT]: 1 when the TTL was set, 0 when the key has no value or the
    /// condition did not hold. A time in the past deletes the key.
    async fn expire(
        &self,
        frame: &[u8],
        args: &[Range<usize>],
        unit_ms: i64,
        name: &str,
    ) -> Result<i64, String> {
        let a = |i: usize| &frame[args[i].clone()];
        let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
        for r in &args[3..] {
            let opt = &frame[r.clone()];
            match opt.to_ascii_uppercase().as_slice() {
                b"NX" => nx = true,
                b"XX" => xx = true,
                b"GT" => gt = true,
                b"LT" => lt = true,
                _ => return Err(format!("ERR Unsupported option {}", String::from_utf8_lossy(opt))),
            }
        }
        if nx && (xx || gt || lt) {
            return Err("ERR NX and XX, GT or LT options at the same time are not compatible".into());
        }
        if gt && lt {
            return Err("ERR GT and LT options at the same time are not compatible".into());
        }
        let expiry = expiry(a(2), unit_ms, false, name)?;
        let Some(old) = self.read(a(1)).await? else { return Ok(0) };
        let current = old.ttl;
        let Expiry::In(new) = expiry else {
            self.remove(a(1)).await?;
            return Ok(1);
        };
        let holds = match current {
            None => !(xx || gt),
            Some(left) => !(nx || (gt && new <= left) || (lt && new >= left)),
        };
        if !holds {
            return Ok(0);
        }
        self.write(a(1), &old.bytes, Some(new)).await?;
        Ok(1)
    }

    /// AUTH [user] password.
    fn auth(&mut self, frame: &[u8], args: &[Range<usize>], out: &mut Out) {
        let a = |i: usize| &frame[args[i].clone()];
        let (user, password) = match args.len() {
            2 if !self.shared.auth.required() => {
                return out.error(
                    "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                );
            }
            2 => (&b"default"[..], a(1)),
            3 => (a(1), a(2)),
            _ => return out.error(SYNTAX),
        };
        match self.login(user, password) {
            Ok(()) => out.ok(),
            Err(message) => out.error(message),
        }
    }

    fn login(&mut self, user: &[u8], password: &[u8]) -> Result<(), &'static str> {
        let auth = &self.shared.auth;
        if !auth.required() {
            // Redis's `default` user without a password accepts any password given with its name.
            return if user == b"default" {
                Ok(())
            } else {
                Err("WRONGPASS invalid username-password pair or user is disabled.")
            };
        }
        match auth.check(user, password) {
            Some(identities) => {
                self.authed = true;
                self.identities = identities;
                Ok(())
            }
            None => Err("WRONGPASS invalid username-password pair or user is disabled."),
        }
    }

    /// HELLO [protover [AUTH user password] [SETNAME name]].
    fn hello(&mut self, frame: &[u8], args: &[Range<usize>], out: &mut Out) {
        let a = |i: usize| &frame[args[i].clone()];
        let mut proto = out.proto;
        if args.len() > 1 {
            match integer(a(1)) {
                Some(v @ (2 | 3)) => proto = u8::try_from(v).unwrap_or(2),
                Some(_) => return out.error("NOPROTO unsupported protocol version"),
                None => return out.error("ERR Protocol version is not an integer or out of range"),
            }
        }
        let mut i = 2;
        let (mut login, mut name) = (None, None);
        while i < args.len() {
            let opt = a(i);
            if opt.eq_ignore_ascii_case(b"AUTH") && i + 2 < args.len() {
                login = Some((a(i + 1), a(i + 2)));
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"SETNAME") && i + 1 < args.len() {
                name = Some(a(i + 1));
                i += 2;
            } else {
                return out
                    .error(&format!("ERR Syntax error in HELLO option '{}'", String::from_utf8_lossy(opt)));
            }
        }
        if let Some((user, password)) = login {
            // With no password configured, HELLO's AUTH is accepted like AUTH default <anything>.
            if let Err(message) = self.login(user, password) {
                return out.error(message);
            }
        } else if !self.authed {
            return out.error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            );
        }
        if let Some(name) = name
            && let Err(message) = self.set_name(name)
        {
            return out.error(message);
        }
        out.proto = proto;
        out.map(7);
        out.bulk(b"server");
        out.bulk(b"redis");
        out.bulk(b"version");
        out.bulk(REDIS_VERSION.as_bytes());
        out.bulk(b"proto");
        out.int(i64::from(proto));
        out.bulk(b"id");
        out.int(i64::try_from(self.id).unwrap_or(i64::MAX));
        out.bulk(b"mode");
        out.bulk(b"standalone");
        out.bulk(b"role");
        out.bulk(b"master");
        out.bulk(b"modules");
        out.array(0);
    }

    fn set_name(&mut self, name: &[u8]) -> Result<(), &'static str> {
        if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
            return Err("ERR Client names cannot contain spaces, newlines or special characters.");
        }
        self.name = (!name.is_empty()).then(|| String::from_utf8_lossy(name).into_owned());
        Ok(())
    }

    /// CLIENT SETINFO | SETNAME | GETNAME | ID | INFO; TRACKING is refused.
    fn client(&mut self, frame: &[u8], args: &[Range<usize>], out: &mut Out) {
        let a = |i: usize| &frame[args[i].clone()];
        let sub = a(1).to_ascii_uppercase();
        let want = |n: usize, out: &mut Out, name: &str| {
            let ok = args.len() == n;
            if !ok {
                out.error(&wrong_arity(&format!("client|{name}")));
            }
            ok
        };
        match sub.as_slice() {
            b"SETINFO" if want(4, out, "setinfo") => {
                let value = String::from_utf8_lossy(a(3)).into_owned();
                if a(2).eq_ignore_ascii_case(b"LIB-NAME") {
                    self.lib.0 = Some(value);
                } else if a(2).eq_ignore_ascii_case(b"LIB-VER") {
                    self.lib.1 = Some(value);
                } else {
                    return out.error(&format!("ERR Unrecognized option '{}'", String::from_utf8_lossy(a(2))));
                }
                out.ok();
            }
            b"SETNAME" if want(3, out, "setname") => match self.set_name(a(2)) {
                Ok(()) => out.ok(),
                Err(message) => out.error(message),
            },
            b"GETNAME" if want(2, out, "getname") => match &self.name {
                Some(name) => out.bulk(name.as_bytes()),
                None => out.null(),
            },
            b"ID" if want(2, out, "id") => out.int(i64::try_from(self.id).unwrap_or(i64::MAX)),
            b"INFO" if want(2, out, "info") => {
                let line = format!(
                    "id={} name={} db=0 resp={} lib-name={} lib-ver={}\n",
                    self.id,
                    self.name.as_deref().unwrap_or(""),
                    out.proto,
                    self.lib.0.as_deref().unwrap_or(""),
                    self.lib.1.as_deref().unwrap_or("")
                );
                out.text(&line);
            }
            b"TRACKING" => out.error(
                "ERR CLIENT TRACKING is not supported by DistCache: a write drops the cached copies on every node itself",
            ),
            b"SETINFO" | b"SETNAME" | b"GETNAME" | b"ID" | b"INFO" => {}
            _ => out.error(&format!("ERR unknown subcommand '{}'. Try CLIENT HELP.", String::from_utf8_lossy(a(1)))),
        }
    }

    /// INFO [section ...]: the sections clients look at (ioredis waits for `loading:0`).
    fn info(&self, frame: &[u8], args: &[Range<usize>], out: &mut Out) {
        let wanted: Vec<String> = args[1..]
            .iter()
            .map(|r| String::from_utf8_lossy(&frame[r.clone()]).to_ascii_lowercase())
            .collect();
        let all = wanted.is_empty()
            || wanted.iter().any(|w| matches!(w.as_str(), "all" | "everything" | "default"));
        let keyspaces = self.shared.engine.keyspaces().all();
        let entries: u64 = keyspaces.iter().map(|ks| ks.store.entries()).sum();
        let bytes: u64 = keyspaces.iter().map(|ks| ks.store.bytes()).sum();
        let metrics = self.shared.engine.metrics();
        let sections: [(&str, String); 8] = [
            (
                "server",
                format!(
                    "redis_version:{REDIS_VERSION}\r\ndistcache_version:{}\r\nredis_mode:standalone\r\nos:{}\r\narch_bits:64\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\n",
                    env!("CARGO_PKG_VERSION"),
                    std::env::consts::OS,
                    std::process::id(),
                    self.shared.port,
                    self.shared.started.elapsed().as_secs()
                ),
            ),
            (
                "clients",
                format!(
                    "connected_clients:{}\r\nmaxclients:{}\r\n",
                    self.shared.connections.load(Ordering::Relaxed),
                    self.shared.max_connections
                ),
            ),
            ("memory", format!("used_memory:{bytes}\r\nmaxmemory_policy:allkeys-lfu\r\n")),
            (
                "persistence",
                "loading:0\r\nasync_loading:0\r\nrdb_bgsave_in_progress:0\r\naof_enabled:0\r\n".to_owned(),
            ),
            ("stats", format!("total_commands_processed:{}\r\n", metrics.resp_commands.get())),
            ("replication", "role:master\r\nconnected_slaves:0\r\n".to_owned()),
            ("cluster", "cluster_enabled:0\r\n".to_owned()),
            (
                "keyspace",
                if entries > 0 {
                    format!("db0:keys={entries},expires=0,avg_ttl=0\r\n")
                } else {
                    String::new()
                },
            ),
        ];
        let mut text = String::new();
        for (name, body) in sections {
            if all || wanted.iter().any(|w| w == name) {
                if !text.is_empty() {
                    text.push_str("\r\n");
                }
                let mut title = name.to_owned();
                title[..1].make_ascii_uppercase();
                let _ = write!(text, "# {title}\r\n{body}");
            }
        }
        out.text(&text);
    }

    /// CONFIG GET pattern ...: the few settings clients and redis-benchmark read. CONFIG SET and the rest are
    /// refused: a node is configured by its config file and keyspaces.
    fn config(&self, frame: &[u8], args: &[Range<usize>], out: &mut Out) {
        let a = |i: usize| &frame[args[i].clone()];
        let sub = a(1).to_ascii_uppercase();
        match sub.as_slice() {
            b"GET" if args.len() >= 3 => {
                let idle = self.shared.idle_timeout.map_or(0, |d| d.as_secs());
                let known = [
                    ("save", String::new()),
                    ("appendonly", "no".to_owned()),
                    ("databases", "1".to_owned()),
                    ("maxclients", self.shared.max_connections.to_string()),
                    ("timeout", idle.to_string()),
                ];
                let matched: Vec<&(&str, String)> = known
                    .iter()
                    .filter(|(name, _)| args[2..].iter().any(|r| glob(&frame[r.clone()].to_ascii_lowercase(), name.as_bytes())))
                    .collect();
                out.map(matched.len());
                for (name, value) in matched {
                    out.bulk(name.as_bytes());
                    out.bulk(value.as_bytes());
                }
            }
            b"GET" => out.error(&wrong_arity("config|get")),
            b"SET" | b"RESETSTAT" | b"REWRITE" => out.error(&format!(
                "ERR CONFIG {} is not supported by DistCache: a node is configured by its config file and keyspaces",
                String::from_utf8_lossy(&sub)
            )),
            _ => out.error(&format!("ERR unknown subcommand '{}'. Try CONFIG HELP.", String::from_utf8_lossy(a(1)))),
        }
    }
}

/// The Redis version DistCache's command set follows (clients pick features by it).
const REDIS_VERSION: &str = "7.2.0";

/// Glob matching with `*` and `?`, as CONFIG GET patterns use.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.split_first(), text.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => glob(rest, text) || (!text.is_empty() && glob(pattern, &text[1..])),
        (Some((b'?', rest)), Some((_, more))) => glob(rest, more),
        (Some((p, rest)), Some((t, more))) if p == t => glob(rest, more),
        _ => false,
    }
}

/// COMMAND, COMMAND COUNT, COMMAND DOCS, COMMAND INFO.
fn command(frame: &[u8], args: &[Range<usize>], out: &mut Out) {
    let info = |out: &mut Out, s: &Spec| {
        out.array(10);
        out.bulk(s.name.as_bytes());
        out.int(s.arity);
        out.set(s.flags.len());
        for f in s.flags {
            out.simple(f);
        }
        out.int(s.keys.0);
        out.int(s.keys.1);
        out.int(s.keys.2);
        out.set(0);
        out.set(0);
        out.array(0);
        out.array(0);
    };
    if args.len() == 1 {
        out.array(COMMANDS.len());
        for s in COMMANDS {
            info(out, s);
        }
        return;
    }
    let sub = frame[args[1].clone()].to_ascii_uppercase();
    match sub.as_slice() {
        b"COUNT" => out.int(i64::try_from(COMMANDS.len()).unwrap_or(0)),
        // No documentation to offer: an empty map (redis-cli then shows no hints).
        b"DOCS" => out.map(0),
        b"INFO" => {
            out.array(args.len() - 2);
            for r in &args[2..] {
                match lookup(&frame[r.clone()]) {
                    Some(s) => info(out, s),
                    None => out.null(),
                }
            }
        }
        _ => out.error(&format!(
            "ERR unknown subcommand '{}'. Try COMMAND HELP.",
            String::from_utf8_lossy(&frame[args[1].clone()])
        )),
    }
}

/// A read's outcome as a reply sees it: a value, no value, or the error's reply text.
fn answer(result: Result<Value, EngineError>) -> Result<Option<Value>, String> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(EngineError::NotFound) => Ok(None),
        Err(e) => Err(error_text(&e)),
    }
}

/// Adds key `key` at position `i` to its keyspace's group (made when it is the keyspace's first key).
fn add_to_group(groups: &mut Vec<Group>, ks: Arc<KeyspaceRuntime>, i: usize, key: &str) {
    match groups.iter_mut().find(|g| Arc::ptr_eq(&g.0, &ks)) {
        Some(g) => {
            g.1.push(i);
            g.2.push(key.to_owned());
        }
        None => groups.push((ks, vec![i], vec![key.to_owned()])),
    }
}

/// A GET-style reply of a value read before: the value, or nil.
fn reply_option(out: &mut Out, value: Option<&Value>) {
    match value {
        Some(v) => out.bulk(&v.bytes),
        None => out.null(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_use_redis_wording() {
        let frame = b"FOO a b";
        let args = vec![0..3, 4..5, 6..7];
        assert_eq!(
            unknown_command(frame, &args),
            "ERR unknown command 'FOO', with args beginning with: 'a' 'b' "
        );
        assert_eq!(wrong_arity("get"), "ERR wrong number of arguments for 'get' command");
    }

    #[test]
    fn expiry_options_follow_redis_rules() {
        assert_eq!(expiry(b"10", 1000, false, "set"), Ok(Expiry::In(Duration::from_secs(10))));
        assert_eq!(expiry(b"0", 1000, false, "set"), Err("ERR invalid expire time in 'set' command".into()));
        assert_eq!(expiry(b"-1", 1, false, "pexpire"), Ok(Expiry::Past));
        assert_eq!(expiry(b"x", 1, false, "set"), Err(NOT_INTEGER.into()));
        assert_eq!(expiry(b"1", 1000, true, "set"), Ok(Expiry::Past));
        let later = (now_unix_ms() / 1000 + 100).to_string();
        assert!(
            matches!(expiry(later.as_bytes(), 1000, true, "set"), Ok(Expiry::In(d)) if d > Duration::from_secs(98))
        );
        assert_eq!(
            expiry(b"9223372036854775807", 1000, false, "set"),
            Err("ERR invalid expire time in 'set' command".into())
        );
    }

    #[test]
    fn config_patterns_are_globs() {
        assert!(glob(b"save", b"save"));
        assert!(glob(b"*", b"appendonly"));
        assert!(glob(b"append*", b"appendonly"));
        assert!(glob(b"s?ve", b"save"));
        assert!(!glob(b"sav", b"save"));
    }

    #[test]
    fn lookup_is_case_insensitive() {
        assert_eq!(lookup(b"gEt").map(|s| s.cmd), Some(Cmd::Get));
        assert!(lookup(b"GETX").is_none());
    }
}
