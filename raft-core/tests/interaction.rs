//! Golden interaction tests, in the manner of etcd-raft's: each
//! `testdata/*.txt` is a script of commands, each followed by the output it
//! produced when the file was last written and understood. The test replays
//! the commands and compares. `RAFT_GOLDEN_REWRITE=1` rewrites the files;
//! commit a changed trace only once you understand why it changed.
//!
//! Commands (one per line, `# ...` are comments):
//! - `cluster n=3 [pre_vote=false] [check_quorum=false] [inflight=N] [msg_bytes=N]`: a new cluster
//! - `tick ID [N]`: N ticks (default 1) on a node
//! - `tick-all N`: N rounds of one tick on every node, messages delivered after each (quietly)
//! - `campaign ID`, `propose ID DATA`, `read ID CONTEXT`, `transfer ID TO`
//! - `isolate ID` / `heal`: drop every message to and from ID, or stop dropping
//! - `add-node ID`: start node ID, empty, with node 1's membership plus itself as a learner
//! - `conf ID add-learner|add-voter|remove X`: propose a membership change (auto-leave)
//! - `deliver`: persist and deliver one round of messages, printing each
//! - `stabilize`: deliver rounds until nothing moves
//! - `status`: each node's role, term, commit, last index, applied, reads served

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::Path;

use cairn_raft_core::{Body, ConfChange, ConfChangeItem, Config, MemStore, Message, NodeId, RawNode};

struct Harness {
    nodes: Vec<RawNode<MemStore>>,
    queue: VecDeque<Message>,
    isolated: BTreeSet<u64>,
    applied: Vec<Vec<String>>,
    reads: Vec<Vec<String>>,
}

fn fmt_msg(m: &Message) -> String {
    let body = match &m.body {
        Body::PreVote { last_index, last_term } => format!("PreVote last={}@{}", last_index.0, last_term.0),
        Body::PreVoteResponse { granted } => format!("PreVoteResponse granted={granted}"),
        Body::Vote { last_index, last_term, forced } => {
            format!("Vote last={}@{}{}", last_index.0, last_term.0, if *forced { " forced" } else { "" })
        }
        Body::VoteResponse { granted } => format!("VoteResponse granted={granted}"),
        Body::Append { prev_index, prev_term, entries, commit, read_seq } => {
            let es: Vec<String> = entries.iter().map(|e| format!("{}@{}", e.index.0, e.term.0)).collect();
            format!(
                "Append prev={}@{} entries=[{}] commit={} read_seq={read_seq}",
                prev_index.0,
                prev_term.0,
                es.join(" "),
                commit.0
            )
        }
        Body::AppendResponse { success, index, hint, read_seq } => {
            format!("AppendResponse success={success} index={} hint={} read_seq={read_seq}", index.0, hint.0)
        }
        Body::Snapshot { index, term, .. } => format!("Snapshot {}@{}", index.0, term.0),
        Body::TimeoutNow => "TimeoutNow".into(),
        Body::ReadIndex { context } => format!("ReadIndex {}", String::from_utf8_lossy(context)),
        Body::ReadIndexResponse { index, context } => {
            format!("ReadIndexResponse index={} {}", index.0, String::from_utf8_lossy(context))
        }
    };
    format!("{}->{} t{} {body}", m.from.0, m.to.0, m.term.0)
}

impl Harness {
    fn new(n: u64, pre_vote: bool, check_quorum: bool, inflight: usize, msg_bytes: u64) -> Harness {
        let peers: Vec<NodeId> = (1..=n).map(NodeId).collect();
        let nodes = peers
            .iter()
            .map(|&id| {
                let mut c = Config::new(id, peers.clone(), id.0);
                c.pre_vote = pre_vote;
                c.check_quorum = check_quorum;
                c.election_ticks = 10;
                c.inflight_msgs_max = inflight;
                c.msg_bytes_max = msg_bytes;
                RawNode::new(c, MemStore::new()).expect("config")
            })
            .collect();
        Harness {
            nodes,
            queue: VecDeque::new(),
            isolated: BTreeSet::new(),
            applied: vec![vec![]; n as usize],
            reads: vec![vec![]; n as usize],
        }
    }

    /// Takes every node's Ready, persisting at once; queues what they send.
    fn collect(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some(rd) = self.nodes[i].ready_in_memory().expect("to itself") {
                if let Some((index, _, _)) = &rd.snapshot {
                    self.applied[i].push(format!("snapshot@{}", index.0));
                }
                self.queue.extend(rd.messages);
                for e in rd.committed_entries {
                    self.applied[i].push(format!("{}@{}", e.index.0, e.term.0));
                }
                for r in rd.read_states {
                    self.reads[i].push(format!("{}@{}", String::from_utf8_lossy(&r.context), r.index.0));
                }
            }
        }
    }

    /// One round: every queued message delivered (or dropped), printed.
    fn deliver(&mut self, out: &mut String) -> bool {
        self.collect();
        let round: Vec<Message> = self.queue.drain(..).collect();
        for m in &round {
            let dropped = self.isolated.contains(&m.from.0) || self.isolated.contains(&m.to.0);
            let _ = writeln!(out, "{}{}", fmt_msg(m), if dropped { "  (dropped)" } else { "" });
            if !dropped {
                let to = m.to.0 as usize - 1;
                if let Err(e) = self.nodes[to].step(m.clone()) {
                    let _ = writeln!(out, "  error: {e}");
                }
            }
            if matches!(m.body, Body::Snapshot { .. }) {
                // The driver's transfer ended: tell the leader how.
                self.nodes[m.from.0 as usize - 1].report_snapshot(m.to, !dropped);
            }
        }
        self.collect();
        !round.is_empty()
    }

    fn status(&self, out: &mut String) {
        for (i, n) in self.nodes.iter().enumerate() {
            let c = n.conf_state();
            let ids = |s: &std::collections::BTreeSet<NodeId>| {
                s.iter().map(|x| x.0.to_string()).collect::<Vec<_>>().join(",")
            };
            let _ = writeln!(
                out,
                "{}: {:?} term={} commit={} last={} voters={}{} learners={} applied=[{}] reads=[{}]",
                i + 1,
                n.role(),
                n.term().0,
                n.commit_index().0,
                n.last_index().0,
                ids(&c.voters),
                if c.is_joint() { format!(" outgoing={}", ids(&c.voters_outgoing)) } else { String::new() },
                ids(&c.learners),
                self.applied[i].join(" "),
                self.reads[i].join(" ")
            );
        }
    }
}

fn run_script(text: &str) -> String {
    let mut h: Option<Harness> = None;
    let mut out = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("  ") {
            continue;
        }
        let Some(cmd) = line.strip_prefix("> ") else { continue };
        let _ = writeln!(out, "> {cmd}");
        let w: Vec<&str> = cmd.split_whitespace().collect();
        let arg = |i: usize| -> u64 {
            w.get(i).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("`{cmd}`: argument {i}"))
        };
        let flag = |name: &str| !w.iter().any(|x| *x == format!("{name}=false"));
        match w[0] {
            "cluster" => {
                let n = w.iter().find_map(|x| x.strip_prefix("n=")).and_then(|x| x.parse().ok()).unwrap_or(3);
                let num = |name: &str, default: u64| {
                    w.iter()
                        .find_map(|x| x.strip_prefix(&format!("{name}=")))
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(default)
                };
                h = Some(Harness::new(
                    n,
                    flag("pre_vote"),
                    flag("check_quorum"),
                    num("inflight", 64) as usize,
                    num("msg_bytes", 1 << 20),
                ));
            }
            _ => {
                let h = h.as_mut().expect("a cluster first");
                let node = |i: u64| i as usize - 1;
                let result = match w[0] {
                    "tick" => {
                        for _ in 0..w.get(2).and_then(|x| x.parse().ok()).unwrap_or(1) {
                            h.nodes[node(arg(1))].tick();
                        }
                        Ok(())
                    }
                    "tick-all" => {
                        let mut quiet = String::new();
                        for _ in 0..arg(1) {
                            for n in h.nodes.iter_mut() {
                                n.tick();
                            }
                            for _ in 0..100 {
                                if !h.deliver(&mut quiet) {
                                    break;
                                }
                            }
                        }
                        Ok(())
                    }
                    "campaign" => {
                        h.nodes[node(arg(1))].campaign();
                        Ok(())
                    }
                    "propose" => h.nodes[node(arg(1))]
                        .propose(vec![w[2].as_bytes().to_vec()])
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    "read" => h.nodes[node(arg(1))].read_index(w[2].as_bytes().to_vec()).map_err(|e| e.to_string()),
                    "transfer" => h.nodes[node(arg(1))].transfer_leader(NodeId(arg(2))).map_err(|e| e.to_string()),
                    "compact" => {
                        let n = &mut h.nodes[node(arg(1))];
                        let conf = n.conf_state().clone();
                        n.store_mut().compact(cairn_raft_core::LogIndex(arg(2)), conf);
                        Ok(())
                    }
                    "add-node" => {
                        let id = NodeId(arg(1));
                        let mut conf = h.nodes[0].conf_state().clone();
                        conf.learners.insert(id);
                        let mut c = Config::new(id, vec![], id.0);
                        c.conf = conf;
                        h.nodes.push(RawNode::new(c, MemStore::new()).expect("config"));
                        h.applied.push(vec![]);
                        h.reads.push(vec![]);
                        Ok(())
                    }
                    "conf" => {
                        let x = NodeId(arg(3));
                        let item = match w[2] {
                            "add-learner" => ConfChangeItem::AddLearner(x),
                            "add-voter" => ConfChangeItem::AddVoter(x),
                            "remove" => ConfChangeItem::Remove(x),
                            other => panic!("unknown change {other}"),
                        };
                        let cc = ConfChange { changes: vec![item], auto_leave: true };
                        h.nodes[node(arg(1))].propose_conf_change(cc).map(|_| ()).map_err(|e| e.to_string())
                    }
                    "isolate" => {
                        h.isolated.insert(arg(1));
                        Ok(())
                    }
                    "heal" => {
                        h.isolated.clear();
                        Ok(())
                    }
                    "deliver" => {
                        h.deliver(&mut out);
                        Ok(())
                    }
                    "stabilize" => {
                        for _ in 0..100 {
                            if !h.deliver(&mut out) {
                                break;
                            }
                        }
                        Ok(())
                    }
                    "status" => {
                        h.status(&mut out);
                        Ok(())
                    }
                    other => panic!("unknown command `{other}`"),
                };
                if let Err(e) = result {
                    let _ = writeln!(out, "error: {e}");
                }
            }
        }
    }
    out
}

/// The file's text with each command's output indented under it.
fn render(out: &str) -> String {
    out.lines().map(|l| if l.starts_with("> ") { format!("{l}\n") } else { format!("  {l}\n") }).collect()
}

#[test]
fn golden_interactions() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let rewrite = std::env::var_os("RAFT_GOLDEN_REWRITE").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("testdata").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert!(files.len() >= 5, "expected the golden scripts in {}", dir.display());
    let mut failures = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        // Keep the comments at the top of the file.
        let header: String =
            text.lines().take_while(|l| l.starts_with('#') || l.is_empty()).map(|l| format!("{l}\n")).collect();
        let got = header + &render(&run_script(&text));
        if got != text {
            if rewrite {
                std::fs::write(&f, &got).expect("write");
            } else {
                failures.push(f.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "traces changed (RAFT_GOLDEN_REWRITE=1 to rewrite, once understood): {failures:?}");
}
