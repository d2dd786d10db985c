//! A cluster of real `kv-server` processes on 127.0.0.1 for the tests.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_kv_client::{Client, ClientOptions};

pub mod relay;
pub mod sim;
use cairn_kv_server::dev::{DevLayout, node_args, prepare, terminate, wait_child};

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub layout: DevLayout,
    pub procs: Vec<Option<Child>>,
    pub env: Vec<(String, String)>,
    /// Extra variables for one node's next start (taken by `start_node`).
    pub node_env: std::collections::HashMap<u64, Vec<(String, String)>>,
    /// Nodes added after the start (joining): their endpoints.
    pub joiners: std::collections::BTreeMap<u64, String>,
    /// Arguments added to a node's every start (the relays' address overrides).
    pub extra_args: std::collections::HashMap<u64, Vec<String>>,
    /// The relay of each directed peer link `(from, to)`, when routed through relays.
    pub relays: std::collections::HashMap<(u64, u64), relay::Relay>,
    /// Nodes that exited by themselves, found by `kill` or `reap`.
    exits: Vec<(u64, String)>,
}

/// Where test ports are drawn from: below the kernel's ephemeral range, so
/// that no socket bound to port 0 meanwhile (a client's, a node's outgoing
/// endpoint) can take a port between its choice and the node's bind.
fn port_range() -> (u16, u16) {
    let ephemeral: Option<(u16, u16)> =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|s| {
            let mut w = s.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some((w.next()??, w.next()??))
        });
    match ephemeral {
        Some((low, _)) if low >= 12_000 => (10_000, low - 10_000),
        Some((_, high)) if high <= 60_000 => (high + 1, 65_535 - high),
        _ => (20_000, 40_000),
    }
}

/// `n` consecutive ports on 127.0.0.1 free for both UDP (QUIC) and TCP
/// (snapshot transfers).
fn free_base_port(n: u16) -> u16 {
    let (from, span) = port_range();
    for _ in 0..200 {
        let base: u16 = from + (rand::random::<u16>() % (span - n));
        let ok = (0..n).all(|i| {
            UdpSocket::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()
        });
        if ok {
            return base;
        }
    }
    panic!("no free UDP and TCP ports");
}

impl Cluster {
    /// Certificates, token and ports for three nodes; none started yet.
    fn prepared(env: &[(&str, &str)]) -> Cluster {
        Cluster::prepared_n(env, 3)
    }

    /// The same for `n` nodes.
    fn prepared_n(env: &[(&str, &str)], n: u64) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids: Vec<u64> = (1..=n).collect();
        let layout = prepare(dir.path(), free_base_port(n as u16), &ids).expect("prepare");
        Cluster {
            dir,
            layout,
            procs: (0..n).map(|_| None).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            node_env: Default::default(),
            joiners: Default::default(),
            extra_args: Default::default(),
            relays: Default::default(),
            exits: Vec::new(),
        }
    }

    pub fn start(env: &[(&str, &str)]) -> Cluster {
        let mut c = Cluster::prepared(env);
        for id in 1..=3 {
            c.start_node(id);
        }
        c
    }

    /// A cluster whose nodes read `toml` as their configuration file
    /// (`CAIRN_CONFIG`, kept in the cluster's folder).
    #[allow(dead_code)] // not every test binary configures its nodes
    pub fn start_with_config(toml: &str) -> Cluster {
        let mut c = Cluster::prepared(&[]);
        let path = c.dir.path().join("node.toml");
        std::fs::write(&path, toml).expect("write the nodes' config");
        c.env.push(("CAIRN_CONFIG".into(), path.display().to_string()));
        for id in 1..=3 {
            c.start_node(id);
        }
        c
    }

    /// A cluster whose every peer link goes through its own relay (see
    /// [`relay`]), so a test can cut links; clients reach the nodes directly.
    pub async fn start_with_relays(env: &[(&str, &str)]) -> Cluster {
        Cluster::start_with_relays_n(env, 3).await
    }

    /// [`Cluster::start_with_relays`] with `n` nodes.
    pub async fn start_with_relays_n(env: &[(&str, &str)], n: u64) -> Cluster {
        let mut c = Cluster::prepared_n(env, n);
        for from in 1..=n {
            let mut overrides = Vec::new();
            for to in (1..=n).filter(|t| *t != from) {
                let target = c.endpoint(to).parse().expect("endpoint");
                let r = relay::Relay::start(target).await;
                overrides.push(format!("{to}={}", r.addr));
                c.relays.insert((from, to), r);
            }
            c.extra_args.insert(from, vec!["--peer-addr-override".into(), overrides.join(",")]);
        }
        for id in 1..=n {
            c.start_node(id);
        }
        c
    }

    /// The bootstrap members' ids.
    pub fn ids(&self) -> Vec<u64> {
        (1..=self.layout.endpoints.len() as u64).collect()
    }

    /// Cuts node `id` off from the other nodes (both directions), or heals it.
    pub fn isolate(&self, id: u64, cut: bool) {
        for ((from, to), r) in &self.relays {
            if *from == id || *to == id {
                r.set(cut, cut);
            }
        }
    }

    /// Cuts every link between the two sides (both directions), or heals them.
    pub fn partition(&self, side: &[u64], cut: bool) {
        for ((from, to), r) in &self.relays {
            if side.contains(from) != side.contains(to) {
                r.set(cut, cut);
            }
        }
    }

    /// Heals every link.
    pub fn heal(&self) {
        for r in self.relays.values() {
            r.set(false, false);
            r.delay(0);
            r.duplicate(0);
        }
    }

    /// SIGSTOP (`pause`) or SIGCONT a node's process.
    pub fn pause(&self, id: u64, pause: bool) {
        if let Some(c) = self.procs.get((id - 1) as usize).and_then(Option::as_ref)
            && let Ok(pid) = i32::try_from(c.id())
        {
            let sig = if pause { nix::sys::signal::Signal::SIGSTOP } else { nix::sys::signal::Signal::SIGCONT };
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    /// The `kv-server run` arguments of node `id` (a joiner's with `--join`).
    pub fn run_args(&self, id: u64) -> Vec<String> {
        let mut args = match self.joiners.get(&id) {
            None => node_args(&self.layout, id),
            Some(ep) => {
                // A joiner: the bootstrap members' cluster (for the cluster id), its own identity, --join.
                let mut a = node_args(&self.layout, 1);
                let certs = self.layout.dir.join("certs");
                let set = |a: &mut Vec<String>, flag: &str, v: String| {
                    let i = a.iter().position(|x| x == flag).expect("flag") + 1;
                    a[i] = v;
                };
                set(&mut a, "--id", id.to_string());
                set(&mut a, "--data-dir", self.layout.dir.join(format!("node-{id}")).display().to_string());
                set(&mut a, "--listen", ep.clone());
                set(&mut a, "--tls-cert", certs.join(format!("node-{id}.pem")).display().to_string());
                set(&mut a, "--tls-key", certs.join(format!("node-{id}.key")).display().to_string());
                a.push("--join".into());
                a
            }
        };
        args.extend(["--tick-ms".into(), "50".into()]);
        args.extend(self.extra_args.get(&id).cloned().unwrap_or_default());
        args
    }

    pub fn start_node(&mut self, id: u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.layout.dir.join(format!("node-{id}.log")))
            .expect("log");
        let args = self.run_args(id);
        let child = Command::new(env!("CARGO_BIN_EXE_kv-server"))
            .args(args)
            .envs(self.env.iter().cloned())
            .envs(self.node_env.remove(&id).unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn kv-server");
        let i = (id - 1) as usize;
        if self.procs.len() <= i {
            self.procs.resize_with(i + 1, || None);
        }
        self.procs[i] = Some(child);
    }

    /// Prepares node `id` (certificates signed by the cluster's CA, a port)
    /// and starts it in join mode; returns its address.
    pub fn start_joiner(&mut self, id: u64) -> String {
        let ep = self.prepare_joiner(id);
        self.start_node(id);
        ep
    }

    /// Certificates and a port for node `id`, to join later; returns its address.
    pub fn prepare_joiner(&mut self, id: u64) -> String {
        let ids: Vec<u64> = (1..=id).collect();
        cairn_kv_server::tls::write_cluster_certs(
            &self.layout.dir.join("certs"),
            "cairn-dev",
            &ids,
            &["localhost".into()],
        )
        .expect("certificates");
        let ep = format!("127.0.0.1:{}", free_base_port(1));
        self.joiners.insert(id, ep.clone());
        ep
    }

    /// Copies the node logs to a folder that outlives the test; returns it.
    pub fn keep_logs(&self, name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cairn-logs-{name}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        for id in 1..=self.procs.len() {
            let f = format!("node-{id}.log");
            let _ = std::fs::copy(self.layout.dir.join(&f), dir.join(&f));
        }
        dir
    }

    /// Ids of the nodes running now.
    pub fn live(&self) -> Vec<u64> {
        (1..=self.procs.len() as u64).filter(|id| self.procs[(*id - 1) as usize].is_some()).collect()
    }

    /// Waits for node `id` to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<i32> {
        let c = self.procs.get_mut((id - 1) as usize)?.as_mut()?;
        let status = wait_child(c, timeout)?;
        self.procs[(id - 1) as usize] = None;
        status.code()
    }

    /// Nodes found to have exited by themselves where the test did not
    /// expect it (by [`Cluster::kill`] and [`Cluster::reap`]): id and status.
    pub fn unexpected_exits(&self) -> &[(u64, String)] {
        &self.exits
    }

    /// Takes note of every node that exited by itself since it was started.
    pub fn reap(&mut self) {
        for i in 0..self.procs.len() {
            let exited = self.procs[i].as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(st) = exited {
                self.procs[i] = None;
                self.exits.push((i as u64 + 1, st.to_string()));
            }
        }
    }

    /// kill -9 (a node that had already exited by itself is noted, see
    /// [`Cluster::unexpected_exits`]).
    pub fn kill(&mut self, id: u64) {
        if let Some(st) = self.kill_or_exited(id) {
            self.exits.push((id, st.to_string()));
        }
    }

    /// kill -9, unless the node had already exited by itself: then its status.
    pub fn kill_or_exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let mut c = self.procs[(id - 1) as usize].take()?;
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// SIGTERM and wait for a clean stop; returns whether it exited 0.
    pub fn stop(&mut self, id: u64) -> bool {
        let Some(mut c) = self.procs[(id - 1) as usize].take() else { return true };
        terminate(&c);
        match wait_child(&mut c, Duration::from_secs(15)) {
            Some(st) => st.success(),
            None => {
                let _ = c.kill();
                let _ = c.wait();
                false
            }
        }
    }

    pub fn endpoint(&self, id: u64) -> String {
        match self.joiners.get(&id) {
            Some(ep) => ep.clone(),
            None => self.layout.endpoints[(id - 1) as usize].clone(),
        }
    }

    pub fn options(&self) -> ClientOptions {
        let ca = std::fs::read(self.layout.dir.join("certs/ca.pem")).expect("ca");
        let mut o = ClientOptions::new(self.layout.endpoints.clone(), self.layout.token.clone(), ca);
        o.retry_deadline = Duration::from_secs(20);
        o.request_timeout = Duration::from_secs(3);
        o
    }

    pub fn client(&self) -> Client {
        Client::new(self.options()).expect("client")
    }

    /// A client of one node only.
    pub fn client_of(&self, id: u64) -> Client {
        let mut o = self.options();
        o.endpoints = vec![self.endpoint(id)];
        Client::new(o).expect("client")
    }

    /// Waits until a live node reports a leader that is live; returns its id.
    pub async fn leader(&self, timeout: Duration) -> u64 {
        let c = self.client();
        let deadline = Instant::now() + timeout;
        loop {
            for id in self.live() {
                if let Ok(s) = c.status_of(&self.endpoint(id), false).await
                    && s.role == "leader"
                {
                    return id;
                }
            }
            assert!(Instant::now() < deadline, "no leader within {timeout:?}; logs in {}", self.layout.dir.display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The status of live node `id`, asked again for up to 10 s while it does
    /// not answer: with many clusters starting at once on two cores, one
    /// handshake can outlast the client's 1 s connect timeout.
    #[allow(dead_code)] // not every test binary asks
    pub async fn status(&self, id: u64) -> cairn_kv_client::protocol::StatusInfo {
        let c = self.client();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match c.status_of(&self.endpoint(id), false).await {
                Ok(s) => return s,
                Err(e) => assert!(Instant::now() < deadline, "node {id} gave no status for 10 s: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every live node applied the same index and hashes the same state.
    pub async fn converged(&self, timeout: Duration) -> (u64, u64) {
        match self.try_converged(timeout).await {
            Ok(h) => h,
            Err(seen) => panic!("replicas did not converge: {seen:?}"),
        }
    }

    /// [`Cluster::converged`], or the last (applied, hash) pairs seen.
    pub async fn try_converged(&self, timeout: Duration) -> Result<(u64, u64), Vec<(u64, u64)>> {
        let c = self.client();
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for id in self.live() {
                if let Ok(s) = c.status_of(&self.endpoint(id), true).await
                    && let Some(h) = s.state_hash
                {
                    seen.push(h);
                }
            }
            let live = self.procs.iter().filter(|p| p.is_some()).count();
            if seen.len() == live && seen.windows(2).all(|w| w[0] == w[1]) {
                return Ok(seen[0]);
            }
            if Instant::now() > deadline {
                return Err(seen);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=self.procs.len() as u64 {
            self.pause(id, false);
        }
        for p in self.procs.iter_mut().flatten() {
            let _ = p.kill();
            let _ = p.wait();
        }
        if std::thread::panicking() {
            // CAIRN_TEST_LOG_LINES shows more of each log (the default 30).
            let lines = std::env::var("CAIRN_TEST_LOG_LINES").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
            for id in 1..=self.procs.len() {
                if let Ok(log) = std::fs::read_to_string(self.layout.dir.join(format!("node-{id}.log"))) {
                    let tail: Vec<&str> = log.lines().rev().take(lines).collect();
                    eprintln!("--- node {id} log (last lines) ---");
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}
