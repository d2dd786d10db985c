//! One node's storage and apply worker on cairn-wal's simulated disk, for
//! tests that drive the apply worker directly (no Raft, no processes).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cairn_kv_server::apply::{Applier, ApplyLimits, InstallSite, Waiters};
use cairn_kv_server::failpoint::Failpoints;
use cairn_kv_server::server::{Recovered, recover};
use cairn_kv_server::snapshot::SharedDb;
use cairn_kv_server::storage::NodeIdentity;
use cairn_lsm::{Background, DurabilityMode, Options};
use cairn_wal::sim::SimDisk;

/// Node 1 of cluster 7 recovered from `disk` (its state under `/node`,
/// embedded, background work inline, then `tweak`ed): the install site and
/// what recovery found.
pub fn recovered(disk: &SimDisk, tweak: impl FnOnce(&mut Options)) -> (InstallSite, Recovered) {
    let mut options = Options::default();
    options.durability = DurabilityMode::Embedded;
    options.background = Background::Inline;
    tweak(&mut options);
    let site = InstallSite {
        fs: disk.fs(),
        data_dir: PathBuf::from("/node"),
        options,
        initial: BTreeMap::from([(1, "127.0.0.1:1".to_string())]),
        failpoints: Arc::new(Failpoints::default()),
    };
    let rec = recover(&site, NodeIdentity { node_id: 1, cluster_id: 7 }, 1 << 20, 1 << 20, &[1]).expect("recover");
    (site, rec)
}

/// An apply worker over `db` (applying with `limits` while the state holds
/// none), the shared state handle, and the proposals' waiters.
pub fn applier(
    site: InstallSite,
    db: cairn_lsm::Db,
    book: cairn_kv_server::state::Book,
    limits: ApplyLimits,
) -> (Applier, Arc<SharedDb>, Waiters) {
    let db = Arc::new(SharedDb::new(Arc::new(db)));
    let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
    let (applied, _) = tokio::sync::watch::channel(0);
    let book = Arc::new(std::sync::RwLock::new(book));
    let applier = Applier::new(db.clone(), site, book, applied, waiters.clone(), limits).expect("applier");
    (applier, db, waiters)
}
