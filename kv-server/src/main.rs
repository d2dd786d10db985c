//! `kv-server`: run a Cairn node, a local dev cluster, or make certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use cairn_kv_server::config::{Config, RunArgs, check_env};
use cairn_kv_server::server::{self, TestSwitches};
use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's allocator: a profile of the leader under put
/// load spent about 15% of its time in glibc malloc and free
/// (`docs/benchmarks.md`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process and its children (the
/// dev cluster's nodes). With huge pages, mimalloc's memory comes in 2 MiB
/// pages and is returned in small pieces; every page touched again then
/// faults in a whole 2 MiB page that the kernel zeroes first. A follower
/// receiving a 230 MB snapshot spent 0.7-1.1 s of system time doing so
/// against 0.11-0.14 s without (`docs/benchmarks.md`, "Huge pages off").
/// A kernel that refuses leaves them as they were. This runs in `main`,
/// after the runtime's first allocations, so mimalloc is also built with
/// `no_thp`: it no longer advises its arenas `MADV_HUGEPAGE`. Its first
/// arena, so advised, made 3 of 5 restarts wait 90-130 ms before `main` ran
/// while the kernel found and zeroed a 2 MiB page (`docs/benchmarks.md`).
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
}

/// A node of Cairn, a replicated, strongly consistent key-value store.
#[derive(Parser, Debug)]
#[command(name = "kv-server", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a node (configuration from --config, flags and CAIRN_* variables).
    Run(Box<RunArgs>),
    /// Start a local 3-node cluster on 127.0.0.1, with certificates and a
    /// token made on first start, and write and read a first key.
    Dev(cairn_kv_server::dev::DevArgs),
    /// Create a new member's data directory from a snapshot file (saved
    /// with `kv snapshot save`); then start it with `run --join` and add it.
    /// Takes the same flags as `run`.
    Restore {
        /// The snapshot file.
        #[arg(long)]
        snapshot: PathBuf,
        #[command(flatten)]
        run: Box<RunArgs>,
    },
    /// Make a cluster CA and node certificates (kept when they exist).
    Certs {
        /// Output folder.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Node ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        /// Extra host names or IP addresses for every node certificate.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Cluster name (in the CA's name).
        #[arg(long, default_value = "cairn")]
        cluster_name: String,
    },
}

fn main() -> ExitCode {
    no_huge_pages();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match cli.cmd {
        Cmd::Run(args) => {
            if let Err(e) = check_env(std::env::vars().map(|(k, _)| k)) {
                eprintln!("kv-server: {e}");
                return ExitCode::from(2);
            }
            let cfg = match Config::load(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("kv-server: {e}");
                    return ExitCode::from(2);
                }
            };
            init_tracing(&cfg.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("kv-server: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            let result = rt.block_on(async {
                if let Some(addr) = cfg.metrics_listen {
                    metrics_exporter_prometheus::PrometheusBuilder::new()
                        .with_http_listener(addr)
                        .install()
                        .map_err(|e| server::ServerError::Other(format!("starting /metrics on {addr}: {e}")))?;
                }
                server::run(cfg, TestSwitches::from_env()).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kv-server: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Restore { snapshot, run } => {
            let cfg = match Config::load(&run) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("kv-server restore: {e}");
                    return ExitCode::from(2);
                }
            };
            match cairn_kv_server::snapshot::restore(&cfg, &snapshot) {
                Ok(h) => {
                    println!(
                        "restored the state at index {} (term {}, {} bytes) into {}; start the node with --join and add it",
                        h.index,
                        h.term,
                        h.total_bytes(),
                        cfg.data_dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kv-server restore: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Dev(args) => match cairn_kv_server::dev::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kv-server dev: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Certs { dir, nodes, hosts, cluster_name } => {
            match cairn_kv_server::tls::write_cluster_certs(&dir, &cluster_name, &nodes, &hosts) {
                Ok(()) => {
                    println!("certificates in {} (ca.pem, ca.key, node-<id>.pem, node-<id>.key)", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kv-server certs: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(cairn_kv_server::config::LOG_FILTER_VAR)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
}
