//! A private Ethernet segment of network namespaces, for partition tests (needs root and iproute2).
//!
//! One "switch" namespace holds a Linux bridge; every node gets a namespace of its own, wired to the bridge by a
//! veth pair (`eth0` inside the node's namespace, port `p<i>` on the bridge); one more veth runs from the test's own
//! (root) namespace into the bridge, so the test reaches every node directly. It is all one L2 segment: no routing,
//! no forwarding, nothing host-wide. The segment is a /24 of 10.213.0.0/16 that nothing on the host uses: the test
//! is `.1`, node `i` is `.(10 + i)`.
//!
//! [`Lan::cut`] takes a node's bridge port down: a real partition, in which the node reaches nobody and nobody
//! reaches it. Packets are dropped, so connections time out rather than being refused: every endpoint has static
//! (permanent) neighbour entries for the others, so no ARP failure turns a cut into a quick "no route to host".
//! [`Lan::heal`] brings the port back up.
//!
//! Names carry the test process's pid: namespaces `distcache-<pid>-<seq>-sw` and `distcache-<pid>-<seq>-n<i>`, the
//! root-side link `dcp<pid>-<seq>` (at most 15 characters, the kernel's limit). Dropping the [`Lan`] deletes
//! everything it created; [`Lan::new`] first deletes what a crashed run left behind (names of this scheme whose pid
//! no longer runs). Processes are started with [`Lan::spawn`] and killed, by their own PID, when their
//! [`NsProcess`] is dropped; nothing else is ever killed.

use std::{
    ffi::OsStr,
    fs::File,
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context as _;

/// Prefix of the namespaces' names.
const NS_PREFIX: &str = "distcache-";
/// Prefix of the root-side link's name.
const LINK_PREFIX: &str = "dcp";
/// Second octet of every segment: 10.213.k.0/24.
const SECOND_OCTET: u8 = 213;
/// Last octet of node 0's address.
const FIRST_NODE_OCTET: usize = 10;
/// At most this many nodes (addresses .10 to .209).
const MAX_NODES: usize = 200;

/// Lans created by this process, so two in one process get distinct names.
static SEQ: AtomicU32 = AtomicU32::new(0);

/// A bridge with one network namespace per node and a link from the root namespace; see the module docs.
pub struct Lan {
    switch: String,
    nodes: Vec<String>,
    host_link: String,
    subnet: u8,
    /// Namespaces created so far, in order (deleted in reverse on drop).
    created: Vec<String>,
    host_link_created: bool,
}

/// One endpoint of the segment, for the static neighbour entries.
struct Endpoint<'a> {
    namespace: Option<&'a str>,
    device: &'a str,
    ip: Ipv4Addr,
    mac: String,
}

impl Lan {
    /// Whether this process can build a `Lan`: root (effective uid 0) and iproute2's `ip` with `netns`.
    pub fn available() -> anyhow::Result<()> {
        let status = std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .context("no Uid line in /proc/self/status")?;
        anyhow::ensure!(
            euid == "0",
            "network namespaces need root; this process runs with effective uid {euid}"
        );
        ip(&["-V"]).context("iproute2's `ip` is needed")?;
        ip(&["netns", "list"]).context("`ip netns` does not work here")?;
        Ok(())
    }

    /// Builds a segment with `nodes` node namespaces (each with `lo` and `eth0` up and its address set).
    pub fn new(nodes: usize) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=MAX_NODES).contains(&nodes), "a Lan has 1 to {MAX_NODES} nodes, not {nodes}");
        Self::available()?;
        remove_leftovers();
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{NS_PREFIX}{pid}-{seq}");
        let host_link = format!("{LINK_PREFIX}{pid}-{seq}");
        anyhow::ensure!(host_link.len() <= 15, "interface name {host_link} is longer than 15 characters");
        let mut lan = Self {
            switch: format!("{tag}-sw"),
            nodes: (0..nodes).map(|i| format!("{tag}-n{i}")).collect(),
            host_link,
            subnet: free_subnet(pid)?,
            created: Vec::new(),
            host_link_created: false,
        };
        // On an error, dropping `lan` removes whatever was created up to there.
        lan.build().with_context(|| format!("cannot set up the network namespaces {tag}-*"))?;
        Ok(lan)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let sw = self.switch.clone();
        self.add_namespace(&sw)?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;

        let host_link = self.host_link.clone();
        let host_mac = mac_of(self.host_ip());
        ip(&[
            "link", "add", &host_link, "address", &host_mac, "type", "veth", "peer", "name", "host", "netns",
            &sw,
        ])?;
        self.host_link_created = true;
        ip(&["-n", &sw, "link", "set", "host", "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("{}/24", self.host_ip()), "dev", &host_link])?;
        ip(&["link", "set", &host_link, "up"])?;

        for i in 0..self.nodes.len() {
            let ns = self.nodes[i].clone();
            self.add_namespace(&ns)?;
            let node_ip = self.node_ip(i)?;
            let port = format!("p{i}");
            let mac = mac_of(node_ip);
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "address", &mac,
                "netns", &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{node_ip}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        self.static_neighbours()?;

        // The host must reach the nodes through this link, not through any other route.
        let first = self.node_ip(0)?.to_string();
        let route = ip(&["-4", "route", "get", &first])?;
        anyhow::ensure!(
            route.contains(&format!("dev {host_link} ")),
            "{first} is not routed through {host_link}: {}",
            route.trim()
        );
        Ok(())
    }

    fn add_namespace(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.created.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Permanent neighbour entries between every pair of endpoints: a cut drops packets silently instead of
    /// failing neighbour resolution (which reports "no route to host" after about 3 s).
    fn static_neighbours(&self) -> anyhow::Result<()> {
        let mut endpoints = vec![Endpoint {
            namespace: None,
            device: &self.host_link,
            ip: self.host_ip(),
            mac: mac_of(self.host_ip()),
        }];
        for (i, ns) in self.nodes.iter().enumerate() {
            let node_ip = self.node_ip(i)?;
            endpoints.push(Endpoint {
                namespace: Some(ns.as_str()),
                device: "eth0",
                ip: node_ip,
                mac: mac_of(node_ip),
            });
        }
        for from in &endpoints {
            for to in endpoints.iter().filter(|to| to.ip != from.ip) {
                let to_ip = to.ip.to_string();
                let entry =
                    ["neigh", "replace", &to_ip, "lladdr", &to.mac, "dev", from.device, "nud", "permanent"];
                let args = match from.namespace {
                    Some(ns) => [&["-n", ns][..], &entry[..]].concat(),
                    None => entry.to_vec(),
                };
                ip(&args)?;
            }
        }
        Ok(())
    }

    /// Number of node namespaces.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True for a Lan without nodes (never: `new` refuses it).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The test's (root namespace) address on the segment.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, SECOND_OCTET, self.subnet, 1)
    }

    /// Node `i`'s address (inside its namespace).
    pub fn node_ip(&self, i: usize) -> anyhow::Result<Ipv4Addr> {
        self.check(i)?;
        let last = u8::try_from(FIRST_NODE_OCTET + i).context("node index out of range")?;
        Ok(Ipv4Addr::new(10, SECOND_OCTET, self.subnet, last))
    }

    /// Node `i`'s namespace name (for `ip netns exec`).
    pub fn namespace(&self, i: usize) -> anyhow::Result<&str> {
        self.check(i)?;
        Ok(&self.nodes[i])
    }

    fn check(&self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(i < self.nodes.len(), "no node {i}: the Lan has {} nodes", self.nodes.len());
        Ok(())
    }

    /// Cuts node `i` off: its bridge port goes down, and every packet to or from it is dropped.
    pub fn cut(&self, i: usize) -> anyhow::Result<()> {
        self.check(i)?;
        ip(&["-n", &self.switch, "link", "set", &format!("p{i}"), "down"]).map(drop)
    }

    /// Reconnects node `i`: its bridge port comes back up.
    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        self.check(i)?;
        ip(&["-n", &self.switch, "link", "set", &format!("p{i}"), "up"]).map(drop)
    }

    /// Starts `program` inside node `i`'s namespace (`ip netns exec`, which execs: the child's PID is the
    /// program's), with `env` added to this process's environment, stdin from /dev/null, and stdout and stderr
    /// appended to `log`. The process is killed when the returned [`NsProcess`] is dropped.
    pub fn spawn<I, S>(
        &self,
        i: usize,
        program: &Path,
        args: I,
        env: &[(&str, &str)],
        log: &Path,
    ) -> anyhow::Result<NsProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let ns = self.namespace(i)?;
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {} in {ns}", program.display()))?;
        Ok(NsProcess { child, namespace: ns.to_owned() })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Deleting the root-side link deletes its bridge end too; deleting a namespace deletes the veths in it
        // (once no process is left inside: a process still running keeps its namespace alive, unnamed).
        if self.host_link_created
            && let Err(e) = ip(&["link", "delete", &self.host_link])
        {
            eprintln!("netns: cannot delete link {}: {e:#}", self.host_link);
        }
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "delete", ns]) {
                eprintln!("netns: cannot delete namespace {ns}: {e:#}");
            }
        }
    }
}

/// A process started by [`Lan::spawn`]; killed (by its PID) and reaped when dropped.
pub struct NsProcess {
    child: Child,
    namespace: String,
}

impl NsProcess {
    /// The process's PID.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The namespace it runs in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Kills it (SIGKILL) and waits for it.
    pub fn kill(&mut self) -> std::io::Result<ExitStatus> {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
        }
        self.child.wait()
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Locally administered MAC of an endpoint, unique on its segment: 02:00 followed by its IPv4 address.
fn mac_of(addr: Ipv4Addr) -> String {
    let [a, b, c, d] = addr.octets();
    format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// Runs `ip` with `args`: its stdout, or an error with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out =
        Command::new("ip").args(args).stdin(Stdio::null()).output().context("cannot run `ip` (iproute2)")?;
    anyhow::ensure!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pid in a name of this scheme (`<prefix><pid>-<seq>[-<role>]`), if it is one.
fn pid_in_name(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let seq = parts.next()?;
    let role_ok = match parts.next() {
        None => prefix == LINK_PREFIX,
        Some(role) => {
            prefix == NS_PREFIX
                && (role == "sw"
                    || role
                        .strip_prefix('n')
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
        }
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if role_ok && digits(pid) && digits(seq) { pid.parse().ok() } else { None }
}

/// Deletes namespaces and root-side links of this scheme whose process no longer runs (a crashed run's). Kills
/// nothing: a process left inside such a namespace keeps running, without the namespace's name.
fn remove_leftovers() {
    let dead = |pid: u32| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(list) = ip(&["-o", "link", "show", "type", "veth"]) {
        // "12: dcp1234-0@if3: <BROADCAST,...> ..."
        let names = list.lines().filter_map(|l| l.split_whitespace().nth(1)).map(|n| {
            let n = n.trim_end_matches(':');
            n.split_once('@').map_or(n, |(name, _)| name)
        });
        for name in names {
            if pid_in_name(name, LINK_PREFIX).is_some_and(dead) {
                let _ = ip(&["link", "delete", name]);
            }
        }
    }
    if let Ok(list) = ip(&["netns", "list"]) {
        // "distcache-1234-0-sw (id: 3)"
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if pid_in_name(name, NS_PREFIX).is_some_and(dead) {
                let _ = ip(&["netns", "delete", name]);
            }
        }
    }
}

/// A k for 10.213.k.0/24 that overlaps no route or address of this (root) namespace, starting from the pid.
fn free_subnet(pid: u32) -> anyhow::Result<u8> {
    let routes = ip(&["-4", "route", "show", "table", "all"])?;
    let used: Vec<(u32, u32)> = routes
        .lines()
        .filter(|l| !l.starts_with("default"))
        .filter_map(|l| l.split_whitespace().find_map(parse_prefix))
        .collect();
    let start = pid % 254;
    for offset in 0..254 {
        let k = u8::try_from((start + offset) % 254 + 1)?;
        let net = u32::from(Ipv4Addr::new(10, SECOND_OCTET, k, 0));
        if !used.iter().any(|&(n, len)| overlaps(net, 24, n, len)) {
            return Ok(k);
        }
    }
    anyhow::bail!("every /24 of 10.{SECOND_OCTET}.0.0/16 is in use on this host")
}

/// `a.b.c.d` or `a.b.c.d/len` as (address, prefix length).
fn parse_prefix(token: &str) -> Option<(u32, u32)> {
    let (addr, len) = token.split_once('/').map_or((token, Some(32)), |(a, l)| (a, l.parse().ok()));
    let len = len.filter(|l| *l <= 32)?;
    addr.parse::<Ipv4Addr>().ok().map(|a| (u32::from(a), len))
}

fn overlaps(a: u32, a_len: u32, b: u32, b_len: u32) -> bool {
    let len = a_len.min(b_len);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a & mask == b & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_scheme_are_recognised_and_others_are_not() {
        assert_eq!(pid_in_name("distcache-123-0-sw", NS_PREFIX), Some(123));
        assert_eq!(pid_in_name("distcache-123-4-n12", NS_PREFIX), Some(123));
        assert_eq!(pid_in_name("dcp4194304-7", LINK_PREFIX), Some(4_194_304));
        for other in
            ["distcache-123-0-x", "distcache-abc-0-sw", "distcache-123-sw", "distcache-123-0-n", "dcp12"]
        {
            assert_eq!(pid_in_name(other, NS_PREFIX), None, "{other}");
            assert_eq!(pid_in_name(other, LINK_PREFIX), None, "{other}");
        }
        assert_eq!(pid_in_name("dcp1-2-sw", LINK_PREFIX), None);
    }

    #[test]
    fn prefixes_overlap_as_expected() {
        let net = |s: &str| parse_prefix(s).expect("prefix");
        let (a, al) = net("10.213.7.0/24");
        for (other, expected) in
            [("10.213.7.1", true), ("10.0.0.0/8", true), ("10.213.8.0/24", false), ("192.0.2.0/24", false)]
        {
            let (b, bl) = net(other);
            assert_eq!(overlaps(a, al, b, bl), expected, "{other}");
        }
        assert_eq!(parse_prefix("dev"), None);
        assert_eq!(parse_prefix("10.0.0.0/33"), None);
    }
}
