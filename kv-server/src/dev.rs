//! `kv-server dev`: a local 3-node cluster as three separate processes on
//! 127.0.0.1, with its CA, certificates and client token kept in the data folder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn_kv_client::{Client, ClientOptions};

/// The settings of a dev cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Folder for the certificates, the token and each node's data.
    #[arg(long, default_value = "cairn-data")]
    pub dir: PathBuf,
    /// First port (UDP for QUIC, TCP for snapshot transfers); the nodes use
    /// this and the next two.
    #[arg(long, default_value_t = 7101)]
    pub base_port: u16,
    /// Do not write and read back a first key once the cluster is up.
    #[arg(long)]
    pub no_first_put: bool,
    /// Start, do the first put and get, and stop at once (for scripts).
    #[arg(long)]
    pub exit_after_first_put: bool,
    /// Serve each node's Prometheus `/metrics` on 127.0.0.1, at this TCP
    /// port and the next two (off by default).
    #[arg(long)]
    pub metrics_base_port: Option<u16>,
}

/// The files a dev cluster keeps.
#[derive(Debug, Clone)]
pub struct DevLayout {
    /// The folder.
    pub dir: PathBuf,
    /// `host:port` per node, id 1..=3.
    pub endpoints: Vec<String>,
    /// The client token.
    pub token: String,
}

/// Creates (or reuses) the CA, node certificates, token and endpoint list in `dir`.
pub fn prepare(dir: &Path, base_port: u16, ids: &[u64]) -> Result<DevLayout, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    crate::tls::write_cluster_certs(&dir.join("certs"), "cairn-dev", ids, &["localhost".into()])
        .map_err(|e| e.to_string())?;
    let token_file = dir.join("token");
    let token = match std::fs::read_to_string(&token_file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let t = format!("dev-{:032x}", rand::random::<u128>());
            std::fs::write(&token_file, format!("{t}\n"))
                .map_err(|e| format!("writing {}: {e}", token_file.display()))?;
            t
        }
    };
    let endpoints: Vec<String> = ids.iter().map(|i| format!("127.0.0.1:{}", base_port as u64 + i - 1)).collect();
    std::fs::write(dir.join("endpoints"), endpoints.join(",") + "\n")
        .map_err(|e| format!("writing the endpoint list: {e}"))?;
    Ok(DevLayout { dir: dir.to_path_buf(), endpoints, token })
}

/// The `kv-server run` arguments of node `id` of a dev layout.
pub fn node_args(layout: &DevLayout, id: u64) -> Vec<String> {
    let certs = layout.dir.join("certs");
    let cluster: Vec<String> = layout.endpoints.iter().enumerate().map(|(i, e)| format!("{}={e}", i + 1)).collect();
    let ep = &layout.endpoints[(id - 1) as usize];
    vec![
        "run".into(),
        "--id".into(),
        id.to_string(),
        "--data-dir".into(),
        layout.dir.join(format!("node-{id}")).display().to_string(),
        "--listen".into(),
        ep.clone(),
        "--initial-cluster".into(),
        cluster.join(","),
        "--tls-ca".into(),
        certs.join("ca.pem").display().to_string(),
        "--tls-cert".into(),
        certs.join(format!("node-{id}.pem")).display().to_string(),
        "--tls-key".into(),
        certs.join(format!("node-{id}.key")).display().to_string(),
        "--client-token-file".into(),
        layout.dir.join("token").display().to_string(),
    ]
}

/// Runs a dev cluster until Ctrl-C.
pub fn run(args: DevArgs) -> Result<(), String> {
    let ids = [1u64, 2, 3];
    let layout = prepare(&args.dir, args.base_port, &ids)?;
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let mut children: Vec<(u64, Child)> = Vec::new();
    for &id in &ids {
        let log_path = layout.dir.join(format!("node-{id}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut node = node_args(&layout, id);
        if let Some(base) = args.metrics_base_port {
            let port = u64::from(base) + id - 1;
            node.extend(["--metrics-listen".into(), format!("127.0.0.1:{port}")]);
        }
        let child = Command::new(&exe)
            .args(node)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("starting node {id}: {e}"))?;
        children.push((id, child));
    }
    println!("Cairn dev cluster: 3 nodes, data in {}", layout.dir.display());
    for (i, ep) in layout.endpoints.iter().enumerate() {
        println!("  node {} at {ep}  (log: {})", i + 1, layout.dir.join(format!("node-{}.log", i + 1)).display());
    }
    println!("  token: {}", layout.token);
    println!("  CA:    {}", layout.dir.join("certs/ca.pem").display());
    println!("Try: cargo run --release -q -p cairn-kv-client --bin kv -- endpoint status --cluster");
    println!(
        "     (kv finds the cluster through ./{}/endpoints; kill a node's process to see the others go on)",
        layout.dir.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let mut reported: Vec<u64> = Vec::new();
    let result = rt.block_on(async {
        if !args.no_first_put {
            first_put(&layout).await?;
        }
        if args.exit_after_first_put {
            return Ok(());
        }
        println!("Running; Ctrl-C stops all three nodes.");
        // SIGTERM stops them too (a supervisor's or a test's stop).
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot watch for SIGTERM: {e}"))?;
        // A node that dies (killed by hand, say) is reported, not restarted:
        // the other two go on, as after a real failure.
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                r = tokio::signal::ctrl_c() => return r.map_err(|e| e.to_string()),
                _ = term.recv() => return Ok(()),
                _ = tick.tick() => {
                    for (id, c) in children.iter_mut() {
                        if let Ok(Some(status)) = c.try_wait()
                            && !reported.contains(id)
                        {
                            reported.push(*id);
                            println!("node {id} exited ({status}); the others go on. Restart it with:");
                            println!("  {} {}", exe.display(), node_args(&layout, *id).join(" "));
                        }
                    }
                }
            }
        }
    });
    stop_all(&mut children);
    result
}

async fn first_put(layout: &DevLayout) -> Result<(), String> {
    let ca = std::fs::read(layout.dir.join("certs/ca.pem")).map_err(|e| e.to_string())?;
    let mut opts = ClientOptions::new(layout.endpoints.clone(), layout.token.clone(), ca);
    opts.retry_deadline = Duration::from_secs(30);
    let client = Client::new(opts).map_err(|e| e.to_string())?;
    let index = client.put("hello", "world").await.map_err(|e| format!("first put: {e}"))?;
    let got = client.get("hello").await.map_err(|e| format!("first get: {e}"))?;
    println!(
        "put hello=world (applied at log index {index}); linearizable get hello -> {}",
        got.as_deref().map(String::from_utf8_lossy).unwrap_or_else(|| "(absent)".into())
    );
    client.close().await;
    Ok(())
}

fn stop_all(children: &mut [(u64, Child)]) {
    // Signal all first so the three stop at once.
    for (_, c) in children.iter() {
        terminate(c);
    }
    for (id, c) in children.iter_mut() {
        match wait_child(c, Duration::from_secs(10)) {
            Some(status) => println!("node {id} stopped ({status})"),
            None => {
                let _ = c.kill();
                let _ = c.wait();
                println!("node {id} killed after 10 s");
            }
        }
    }
}

/// Sends SIGTERM to `child`.
pub fn terminate(child: &Child) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}
