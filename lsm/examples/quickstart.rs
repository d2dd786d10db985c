//! A first program with cairn-lsm, using only the public API: open, write,
//! batch, scan both ways, a read view, a range delete, a checkpoint, reopen.
//!
//! ```text
//! cargo run --release -p cairn-lsm --example quickstart
//! ```

use cairn_lsm::{Db, Options, WriteBatch};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("cairn-lsm-quickstart-{}", std::process::id()));
    let db = Db::open(&dir, Options::default())?;

    // Every write is durable when it returns (the default SyncPolicy::EveryWrite).
    for i in 0..1000u32 {
        db.put(format!("sensor/{i:04}"), format!("{}", i * 7))?;
    }
    let mut batch = WriteBatch::new();
    batch.put("config/mode", "fast").put("config/limit", "100").delete("sensor/0000");
    db.write(&batch)?; // all three or none

    println!("config/mode = {:?}", db.get(b"config/mode")?);
    let first: Vec<_> = db.prefix(b"sensor/").take(3).collect::<Result<_, _>>()?;
    let last: Vec<_> = db.prefix_rev(b"sensor/").take(3).collect::<Result<_, _>>()?;
    println!("first sensors {first:?}\nlast sensors {last:?}");

    // A read view keeps seeing the data as it was, whatever happens next.
    let view = db.read_view();
    db.delete_range("sensor/0100", "sensor/0900")?;
    db.flush()?;
    db.compact_range::<std::ops::RangeFull, &[u8]>(..)?;
    println!(
        "sensors now: {}, in the view taken before the range delete: {}",
        db.prefix(b"sensor/").count(),
        view.prefix(b"sensor/").count()
    );
    drop(view);

    // A checkpoint is a consistent copy (hard links) that opens as an engine.
    let ckpt = dir.with_extension("checkpoint");
    let info = db.checkpoint(&ckpt)?;
    println!("checkpoint of {} tables at sequence number {}", info.tables.len(), info.last_seq);
    let stats = db.stats();
    println!("levels {:?}, write amplification {:.2}", stats.levels, stats.write_amplification);
    db.close()?;

    let db = Db::open(&dir, Options::default())?;
    assert_eq!(db.get(b"sensor/0500")?, None);
    assert_eq!(db.get(b"sensor/0950")?.as_deref(), Some(&b"6650"[..]));
    db.close()?;
    std::fs::remove_dir_all(&dir)?;
    std::fs::remove_dir_all(&ckpt)?;
    println!("ok");
    Ok(())
}
