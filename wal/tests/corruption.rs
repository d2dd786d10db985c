//! A flipped bit in each kind of place (length word, payload, record crc,
//! header record, segment header; in the last segment and in a middle one)
//! gives each recovery mode its documented result (docs/design/wal.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_wal::format::{Decoded, SEGMENT_HEADER_BYTES, decode_record, decode_segment_header, segment_seed};
use cairn_wal::{Error, Preparation, RecoveryMode, StdFs, UserKind, Wal, WalOptions};

const K: UserKind = UserKind::new(0);
const RECORDS: u64 = 90;

fn opts(mode: RecoveryMode) -> WalOptions {
    let mut o = WalOptions::default();
    o.segment_bytes_max = 2048;
    o.preparation = Preparation::Grow;
    o.recovery = mode;
    o
}

fn payload(p: u64) -> Vec<u8> {
    format!("record {p:05} ").repeat(8).into_bytes()
}

/// A log of `RECORDS` records over several segments; returns the segment paths.
fn build(dir: &Path) -> Vec<PathBuf> {
    let wal = Wal::create(Arc::new(StdFs), dir, opts(RecoveryMode::Strict), b"meta").expect("create");
    wal.set_state(b"hard state").expect("state");
    for p in 1..=RECORDS {
        wal.append(K, p, &payload(p)).expect("append");
    }
    drop(wal);
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 4, "the test wants several segments, got {}", segs.len());
    segs
}

/// Offsets of the records of a segment file: (offset, kind, position).
fn records_of(path: &Path) -> Vec<(usize, u16, u64)> {
    let buf = std::fs::read(path).expect("read segment");
    let h = decode_segment_header(&buf).expect("header");
    let seed = segment_seed(h.seq, h.salt);
    let (mut off, mut chain, mut out) = (SEGMENT_HEADER_BYTES, h.prev_chain, Vec::new());
    while let Decoded::Record(f) = decode_record(&buf, off, seed, chain) {
        out.push((off, f.kind, f.position));
        chain = f.chain;
        off = f.end;
    }
    out
}

fn flip(path: &Path, offset: usize, bit: u8) {
    let mut b = std::fs::read(path).expect("read");
    b[offset] ^= 1 << bit;
    std::fs::write(path, b).expect("write");
}

#[derive(Clone, Copy, Debug)]
enum Place {
    LengthWord,
    Payload,
    RecordCrc,
    HeaderRecord,
    SegmentHeader,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Where {
    /// The first user record of a middle segment.
    Middle,
    /// The first user record of the last segment (valid records follow it).
    LastNotTail,
    /// The very last record of the log.
    Tail,
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Corrupt(PathBuf),
    TornTail { records: usize },
    Stopped { path: PathBuf, records: usize },
}

fn damage(segs: &[PathBuf], place: Place, at: Where) -> (PathBuf, usize) {
    let seg = match at {
        Where::Middle => segs[segs.len() / 2].clone(),
        Where::LastNotTail | Where::Tail => segs[segs.len() - 1].clone(),
    };
    let recs = records_of(&seg);
    let users: Vec<_> = recs.iter().filter(|r| r.1 >= 16).collect();
    let target = match (place, at) {
        (Place::HeaderRecord, _) => recs[0].0, // the metadata record
        (Place::SegmentHeader, _) => 0,
        (_, Where::Tail) => users.last().expect("records").0,
        _ => users.first().expect("records").0,
    };
    let off = match place {
        Place::LengthWord => target, // low byte of the payload length
        Place::Payload => target + 24 + 3,
        Place::RecordCrc => target + 16,
        Place::HeaderRecord => target + 24, // first metadata byte
        Place::SegmentHeader => 17,         // a byte of the seq
    };
    flip(&seg, off, 2);
    (seg, off)
}

fn outcome(dir: &Path, mode: RecoveryMode) -> Outcome {
    match Wal::open(Arc::new(StdFs), dir, opts(mode)) {
        Ok((wal, report)) => {
            let n = wal.read_range(.., u64::MAX).expect("read").len();
            // Whatever is returned is what was written.
            for r in wal.read_range(.., u64::MAX).expect("read").iter() {
                assert_eq!(r.payload, payload(r.position), "position {}", r.position);
            }
            if let Some(stop) = report.stopped_at {
                assert!(matches!(wal.append(K, 1_000, b"x"), Err(Error::ReadOnly(_))));
                Outcome::Stopped { path: stop.path, records: n }
            } else if report.torn_tail.is_some() {
                Outcome::TornTail { records: n }
            } else {
                panic!("{mode:?} opened a damaged log without reporting it: {report:?}")
            }
        }
        Err(Error::Corrupt { path, .. }) => Outcome::Corrupt(path),
        Err(e) => panic!("{mode:?}: unexpected error {e}"),
    }
}

#[test]
fn every_place_and_mode_gives_its_documented_result() {
    use Outcome::*;
    let places = [Place::LengthWord, Place::Payload, Place::RecordCrc, Place::HeaderRecord, Place::SegmentHeader];
    for place in places {
        for at in [Where::Middle, Where::LastNotTail, Where::Tail] {
            if matches!(place, Place::HeaderRecord | Place::SegmentHeader) && at == Where::LastNotTail {
                continue; // the same bytes as Tail for header damage
            }
            for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTornTail, RecoveryMode::PointInTime] {
                let tmp = tempfile::tempdir().expect("tmp");
                let dir = tmp.path().join("wal");
                let segs = build(&dir);
                let (seg, off) = damage(&segs, place, at);
                let got = outcome(&dir, mode);
                let ctx = format!("{place:?} at {at:?} (byte {off} of {}) in {mode:?}", seg.display());
                let header = matches!(place, Place::HeaderRecord | Place::SegmentHeader);
                match (mode, at) {
                    // Header damage is never a torn tail: headers are synced before the rename.
                    (RecoveryMode::TolerateTornTail, Where::Tail) if !header => {
                        assert_eq!(got, TornTail { records: RECORDS as usize - 1 }, "{ctx}")
                    }
                    (RecoveryMode::PointInTime, _) => match got {
                        Stopped { path, records } => {
                            assert_eq!(path, seg, "{ctx}");
                            assert!(records < RECORDS as usize, "{ctx}");
                        }
                        other => panic!("{ctx}: expected a stop, got {other:?}"),
                    },
                    _ => assert_eq!(got, Corrupt(seg.clone()), "{ctx}"),
                }
            }
        }
    }
}

#[test]
fn a_torn_tail_is_zeroed_and_the_log_continues() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("wal");
    let segs = build(&dir);
    let last = segs.last().expect("segments");
    // Tear the last record: cut the file in the middle of it.
    let recs = records_of(last);
    let tail = recs.last().expect("records").0;
    let f = std::fs::OpenOptions::new().write(true).open(last).expect("open");
    f.set_len(tail as u64 + 30).expect("truncate");
    drop(f);
    let (wal, report) = Wal::open(Arc::new(StdFs), &dir, opts(RecoveryMode::TolerateTornTail)).expect("open");
    let torn = report.torn_tail.expect("a torn tail is reported");
    assert_eq!(torn.offset, tail as u64);
    assert_eq!(wal.last_position(), Some(RECORDS - 1));
    wal.append(K, RECORDS, &payload(RECORDS)).expect("append after repair");
    drop(wal);
    let (wal, report) = Wal::open(Arc::new(StdFs), &dir, opts(RecoveryMode::Strict)).expect("strict reopen");
    assert!(report.torn_tail.is_none());
    assert_eq!(wal.read_range(.., u64::MAX).expect("read").len(), RECORDS as usize);
    assert_eq!(wal.state().as_deref(), Some(&b"hard state"[..]));
}

#[test]
fn a_missing_middle_segment_is_an_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("wal");
    let segs = build(&dir);
    std::fs::remove_file(&segs[1]).expect("remove");
    for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTornTail] {
        match Wal::open(Arc::new(StdFs), &dir, opts(mode)) {
            Err(Error::MissingSegment { missing: 1, .. }) => {}
            other => panic!("{mode:?}: {other:?}"),
        }
    }
    let (wal, report) = Wal::open(Arc::new(StdFs), &dir, opts(RecoveryMode::PointInTime)).expect("pit");
    let stop = report.stopped_at.expect("stopped");
    assert_eq!(stop.segments_not_read.len(), segs.len() - 2);
    assert!(wal.read_range(.., u64::MAX).expect("read").len() < RECORDS as usize);
}

#[test]
fn a_second_writer_is_refused_but_a_reader_is_not() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("wal");
    let wal = Wal::create(Arc::new(StdFs), &dir, opts(RecoveryMode::Strict), b"m").expect("create");
    wal.append(K, 1, b"one").expect("append");
    assert!(matches!(Wal::open(Arc::new(StdFs), &dir, opts(RecoveryMode::Strict)), Err(Error::Locked { .. })));
    let (reader, _) = Wal::open_read_only(Arc::new(StdFs), &dir, opts(RecoveryMode::Strict)).expect("read-only");
    assert_eq!(reader.read_range(.., u64::MAX).expect("read").len(), 1);
    assert!(matches!(reader.append(K, 2, b"two"), Err(Error::ReadOnly(_))));
    assert!(matches!(
        Wal::create(Arc::new(StdFs), tmp.path().join("wal"), opts(RecoveryMode::Strict), b"m"),
        Err(Error::Locked { .. } | Error::AlreadyExists { .. })
    ));
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut o = opts(RecoveryMode::Strict);
    o.record_bytes_max = 1000;
    let wal = Wal::create(Arc::new(StdFs), tmp.path().join("wal"), o, b"m").expect("create");
    wal.append(K, 5, b"five").expect("append");
    assert!(matches!(wal.append(K, 5, b"again"), Err(Error::PositionNotRising { position: 5, last: 5 })));
    assert!(matches!(wal.append(K, 4, b"lower"), Err(Error::PositionNotRising { .. })));
    assert!(matches!(wal.append(K, 6, &[0; 1001]), Err(Error::RecordTooLarge { len: 1001, max: 1000 })));
    assert!(UserKind::try_new(UserKind::MAX + 1).is_none());
    assert!(matches!(wal.read_range(0..3, u64::MAX), Err(Error::PositionNotFound { position: 0, .. })));
    assert!(matches!(wal.replay_from(Some(3)), Err(Error::MarkerNotFound(3))));
    // A refused batch wrote nothing.
    assert_eq!(wal.last_position(), Some(5));
    wal.snapshot_marker(5, b"term 2").expect("marker");
    wal.append(K, 6, b"six").expect("append");
    let replay: Vec<u64> = wal
        .replay_from(Some(5))
        .expect("replay")
        .flat_map(|r| r.expect("batch").iter().map(|x| x.position).collect::<Vec<_>>())
        .collect();
    assert_eq!(replay, [6]);
}

/// The scan reads a zero-filled segment's zeros through a small buffer (see
/// `read_segment`): it must still see every record, a torn tail far into the
/// segment, and a valid record that follows a zeroed length word several
/// MiB in, as if it had read the whole file.
#[test]
fn a_large_zero_filled_segment_is_scanned_as_a_whole() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("wal");
    let mut o = WalOptions::default();
    o.segment_bytes_max = 16 << 20;
    o.preparation = Preparation::ZeroFill;
    let big = |p: u64| vec![(p % 251) as u8 | 1; 100_000];
    let wal = Wal::create(Arc::new(StdFs), &dir, o.clone(), b"meta").expect("create");
    for p in 1..=40 {
        wal.append(K, p, &big(p)).expect("append");
    }
    drop(wal);
    let segs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    let seg = &segs[0];
    assert_eq!(std::fs::metadata(seg).expect("stat").len(), 16 << 20, "a zero-filled segment");
    let recs = records_of(seg);
    assert!(recs.last().expect("records").0 > 3 << 20, "the records reach past 3 MiB");

    // Clean: every record.
    let open = |mode| {
        let mut o = o.clone();
        o.recovery = mode;
        Wal::open(Arc::new(StdFs), &dir, o)
    };
    let (wal, _) = open(RecoveryMode::Strict).expect("open");
    assert_eq!(wal.read_range(.., u64::MAX).expect("read").len(), 40);
    drop(wal);

    // A zeroed length word with valid records after it, MiB away: corrupt.
    let original = std::fs::read(seg).expect("read");
    let (at, _, _) = recs.iter().find(|r| r.2 == 5).copied().expect("record 5");
    let mut b = original.clone();
    b[at..at + 8].fill(0);
    std::fs::write(seg, &b).expect("write");
    match open(RecoveryMode::TolerateTornTail) {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("valid record follows"), "{reason}"),
        other => panic!("a zeroed length word before valid records was taken: {:?}", other.map(|r| r.1)),
    }

    // A torn last record (its checksum broken): dropped, the rest kept.
    let (at, _, _) = *recs.last().expect("records");
    let mut b = original;
    b[at + 24 + 500] ^= 0xff;
    std::fs::write(seg, &b).expect("write");
    let (wal, report) = open(RecoveryMode::TolerateTornTail).expect("open");
    let torn = report.torn_tail.expect("a torn tail");
    assert_eq!((torn.offset, torn.bytes_dropped), (at as u64, 24 + 100_000));
    assert_eq!(wal.last_position(), Some(39));
}
