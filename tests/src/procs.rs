//! Real `distcache-node` processes on loopback with static discovery, which tests stop, freeze (SIGSTOP), thaw
//! and restart by their PIDs. Each node keeps its addresses across restarts, as a StatefulSet pod keeps its name.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use distcache_node::ring::{Member, Ring};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::{built_binary, http_get, spare_addrs, wait_for};

/// One node process (none while stopped); killed by its PID when dropped.
pub struct NodeProc {
    /// Member name (`node-1`, …).
    pub name: String,
    /// Client gRPC address.
    pub grpc: SocketAddr,
    /// Peer address (its ring address).
    pub peer: SocketAddr,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// RESP address, when the cluster was started with [`ProcCluster::start_resp`].
    pub resp: Option<SocketAddr>,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NodeProc {
    /// The node's log so far (stdout and stderr of every start).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts the process (again); its log is appended to.
    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} is running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(built_binary("distcache-node")?)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,distcache_node=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let child = self.child.as_ref().ok_or_else(|| anyhow::anyhow!("{} is not running", self.name))?;
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, signal)?;
        Ok(())
    }

    /// SIGTERM, then waits for the process to exit (it hands its entries off first).
    pub async fn stop(&mut self, within: Duration) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)?;
        let mut child = self.child.take().ok_or_else(|| anyhow::anyhow!("{} is not running", self.name))?;
        let mut status = None;
        let exited = wait_for(within, &format!("{} to exit after SIGTERM", self.name), || {
            let done = child.try_wait().map(|s| {
                status = s;
                s.is_some()
            });
            std::future::ready(done.map_err(anyhow::Error::from))
        })
        .await;
        if let Err(e) = exited {
            self.child = Some(child);
            return Err(e);
        }
        match status {
            Some(s) if s.success() => Ok(()),
            other => anyhow::bail!("{} exited with {other:?}", self.name),
        }
    }

    /// The ring members this node reports on `/admin/peers` (`None` when it does not answer).
    pub async fn members(&self) -> Option<Vec<String>> {
        let (status, body) = http_get(self.admin, "/admin/peers").await.ok()?;
        if status != 200 {
            return None;
        }
        let report: distcache_api::PeersReport = serde_json::from_str(&body).ok()?;
        Some(report.members.into_iter().map(|m| m.name).collect())
    }

    /// True when `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        matches!(http_get(self.admin, "/readyz").await, Ok((200, _)))
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Node processes with static discovery over each other's peer addresses.
pub struct ProcCluster {
    /// The nodes, `node-1` first.
    pub nodes: Vec<NodeProc>,
    dir: tempfile::TempDir,
}

impl ProcCluster {
    /// Writes configs for `n` nodes (keyspaces file `keyspaces` in the same directory; `extra` appended to every
    /// node config) and starts them.
    pub fn start(n: usize, keyspaces: &str, extra: &str) -> anyhow::Result<Self> {
        Self::start_with(n, keyspaces, extra, None)
    }

    /// As [`ProcCluster::start`], with the RESP front end on: each node listens on its own free address, with
    /// `resp_fields` (YAML flow-map entries such as `defaultKeyspace: users, password: secret`) added to its
    /// `resp` section.
    pub fn start_resp(n: usize, keyspaces: &str, extra: &str, resp_fields: &str) -> anyhow::Result<Self> {
        Self::start_with(n, keyspaces, extra, Some(resp_fields))
    }

    fn start_with(n: usize, keyspaces: &str, extra: &str, resp_fields: Option<&str>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("keyspaces.yaml"), keyspaces)?;
        // grpc, peer, admin and resp addresses of every node, chosen together so none repeats.
        let spare = spare_addrs(4 * n)?;
        let peers: Vec<String> = spare.chunks_exact(4).map(|a| format!("\"{}\"", a[1])).collect();
        let mut nodes = Vec::new();
        for (i, a) in spare.chunks_exact(4).enumerate() {
            let (grpc, peer, admin, resp) = (a[0], a[1], a[2], a[3]);
            let name = format!("node-{}", i + 1);
            let config = dir.path().join(format!("{name}.yaml"));
            let resp = resp_fields.map(|fields| (resp, fields));
            let resp_section = match resp {
                Some((addr, "")) => format!("resp: {{ listen: \"{addr}\" }}\n"),
                Some((addr, fields)) => format!("resp: {{ listen: \"{addr}\", {fields} }}\n"),
                None => String::new(),
            };
            std::fs::write(
                &config,
                format!(
                    "name: {name}\nlisten: {grpc}\npeerListen: {peer}\nadvertise: {peer}\nadmin: {admin}\n\
                     discovery:\n  static: {{ peers: [{}], probeInterval: 250ms }}\n\
                     keyspacesFile: ./keyspaces.yaml\n{resp_section}{extra}\n",
                    peers.join(", ")
                ),
            )?;
            let log = dir.path().join(format!("{name}.log"));
            let resp = resp.map(|(addr, _)| addr);
            let mut node = NodeProc { name, grpc, peer, admin, resp, config, log, child: None };
            node.start()?;
            nodes.push(node);
        }
        Ok(Self { nodes, dir })
    }

    /// The directory of the configs and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The ring every node has once all are members.
    pub fn ring(&self) -> Ring {
        Ring::new(self.nodes.iter().map(|n| Member::new(n.name.clone(), n.peer.to_string())).collect())
    }

    /// Index of the node that owns `key` when all are members.
    pub fn owner_of(&self, key: &str) -> usize {
        let ring = self.ring();
        let owner =
            ring.owner(distcache_node::ring::key_hash(key)).map(|m| m.name.clone()).unwrap_or_default();
        self.nodes.iter().position(|n| n.name == owner).unwrap_or(0)
    }

    /// Waits until each node of `which` is ready and reports exactly `members` (names) as its ring.
    pub async fn wait_views(
        &self,
        which: &[usize],
        members: &[&str],
        within: Duration,
    ) -> anyhow::Result<()> {
        let mut want: Vec<String> = members.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        let waited = wait_for(within, &format!("nodes {which:?} ready with members {want:?}"), || {
            let want = want.clone();
            async move {
                for &i in which {
                    let node = &self.nodes[i];
                    let got = node.members().await.map(|mut m| {
                        m.sort();
                        m
                    });
                    if !(node.ready().await && got.as_ref() == Some(&want)) {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        })
        .await;
        waited.map_err(|e| e.context(self.logs()))
    }

    /// Every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let logs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, std::fs::read_to_string(&n.log).unwrap_or_default()))
            .collect();
        logs.join("\n")
    }
}
