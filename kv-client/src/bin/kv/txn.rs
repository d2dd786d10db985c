//! `kv txn`: a transaction written as text, in three parts separated by
//! blank lines (as etcdctl's): the comparisons, the operations when they
//! all hold, the operations otherwise.
//!
//! ```text
//! mod("lock") = 0
//! value("config") != "old"
//!
//! put lock "me" --prev-kv
//! get config
//!
//! get lock
//! ```
//!
//! A comparison is `FIELD("KEY") OP OPERAND`: FIELD is `value` (`val`),
//! `version` (`ver`), `create`, `mod` or `exists`; OP is `=`, `!=`, `<` or
//! `>`; the operand is a quoted string for `value`, a number for the
//! revisions and the version, `true` or `false` for `exists`. An operation
//! is `put KEY VALUE [--prev-kv] [--lease ID]`, `get KEY`, `del KEY [--prev-kv]` or
//! `delrange START END`. Words may be quoted with `"` (with `\"` and `\\`
//! inside); with `--hex`, keys and values are hex.

use cairn_kv_client::Txn;
use cairn_kv_client::protocol::{Compare, CompareOp, CompareTarget, TxnOp};

/// Splits a line into words: bare, or double-quoted with `\"` and `\\`.
fn words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut w = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("an unclosed quote in `{line}`")),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(e @ ('"' | '\\')) => w.push(e),
                        Some('n') => w.push('\n'),
                        other => return Err(format!("an unknown escape \\{} in `{line}`", other.unwrap_or(' '))),
                    },
                    Some(x) => w.push(x),
                }
            }
        } else {
            while let Some(&x) = chars.peek() {
                if x.is_whitespace() {
                    break;
                }
                w.push(x);
                chars.next();
            }
        }
        out.push(w);
    }
    Ok(out)
}

/// Parses one comparison line; `input` turns a key or value as typed into bytes.
fn compare(line: &str, input: &dyn Fn(&str) -> Result<Vec<u8>, String>) -> Result<Compare, String> {
    let bad = |why: &str| format!("`{line}`: {why} (expected e.g. `mod(\"key\") = 0` or `value(\"key\") = \"v\"`)");
    let open = line.find('(').ok_or_else(|| bad("no `(`"))?;
    let field = line[..open].trim();
    let rest = &line[open + 1..];
    let close = rest.rfind(')').ok_or_else(|| bad("no `)`"))?;
    let key_words = words(&rest[..close])?;
    let [key] = key_words.as_slice() else { return Err(bad("one key between the parentheses")) };
    let tail = words(&rest[close + 1..])?;
    let [op, operand] = tail.as_slice() else { return Err(bad("an operator and an operand after the key")) };
    let op = match op.as_str() {
        "=" | "==" => CompareOp::Equal,
        "!=" => CompareOp::NotEqual,
        "<" => CompareOp::Less,
        ">" => CompareOp::Greater,
        _ => return Err(bad("the operator is one of = != < >")),
    };
    let number = || operand.parse::<u64>().map_err(|_| bad("the operand is a number"));
    let target = match field {
        "value" | "val" => CompareTarget::Value(input(operand)?),
        "version" | "ver" => CompareTarget::Version(number()?),
        "create" | "create_revision" => CompareTarget::CreateRevision(number()?),
        "mod" | "mod_revision" => CompareTarget::ModRevision(number()?),
        "exists" => CompareTarget::Exists(match operand.as_str() {
            "true" => true,
            "false" => false,
            _ => return Err(bad("the operand of exists is true or false")),
        }),
        _ => return Err(bad("the field is value, version, create, mod or exists")),
    };
    Ok(Compare { key: input(key)?, op, target })
}

/// Parses one operation line.
fn op(line: &str, input: &dyn Fn(&str) -> Result<Vec<u8>, String>) -> Result<TxnOp, String> {
    let mut w = words(line)?;
    let prev_kv = w.iter().any(|x| x == "--prev-kv");
    w.retain(|x| x != "--prev-kv");
    let mut lease = 0;
    if let Some(at) = w.iter().position(|x| x == "--lease") {
        let id = w.get(at + 1).and_then(|x| x.parse::<u64>().ok());
        lease = id.ok_or_else(|| format!("`{line}`: --lease takes a lease id"))?;
        w.drain(at..at + 2);
    }
    let w: Vec<&String> = w.iter().collect();
    let bad = |why: &str| {
        format!(
            "`{line}`: {why} (expected `put KEY VALUE [--prev-kv]`, `get KEY`, `del KEY [--prev-kv]` or `delrange START END`)"
        )
    };
    match w.as_slice() {
        [cmd, key, value] if cmd.as_str() == "put" => {
            Ok(TxnOp::Put { key: input(key)?, value: input(value)?, prev_kv, lease })
        }
        _ if lease != 0 && w.first().is_none_or(|c| c.as_str() != "put") => Err(bad("--lease goes with put")),
        [cmd, key] if cmd.as_str() == "get" && !prev_kv => Ok(TxnOp::Get { key: input(key)? }),
        [cmd, key] if cmd.as_str() == "del" => Ok(TxnOp::Delete { key: input(key)?, prev_kv }),
        [cmd, start, end] if cmd.as_str() == "delrange" && !prev_kv => {
            Ok(TxnOp::DeleteRange { start: input(start)?, end: input(end)? })
        }
        [] => Err(bad("an empty line")),
        _ => Err(bad("not an operation")),
    }
}

/// Parses a whole transaction.
pub(crate) fn parse(text: &str, input: &dyn Fn(&str) -> Result<Vec<u8>, String>) -> Result<Txn, String> {
    let mut part = 0;
    let mut seen_in_part = false;
    let mut txn = Txn::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('#') {
            continue;
        }
        if line.is_empty() {
            if seen_in_part || part == 0 {
                part += 1;
                seen_in_part = false;
            }
            continue;
        }
        seen_in_part = true;
        let at = |e: String| format!("line {}: {e}", n + 1);
        match part {
            0 => txn.compares.push(compare(line, input).map_err(at)?),
            1 => txn.success.push(op(line, input).map_err(at)?),
            2 => txn.failure.push(op(line, input).map_err(at)?),
            _ => return Err(at("more than three parts (comparisons, success, failure)".into())),
        }
    }
    Ok(txn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(s: &str) -> Result<Vec<u8>, String> {
        Ok(s.as_bytes().to_vec())
    }

    #[test]
    fn a_transaction_parses_in_three_parts() {
        let t = parse(
            "mod(\"lock\") = 0\nvalue(\"c\") != \"old value\"\nexists(k) = true\n\nput lock \"me \\\"x\\\"\" --prev-kv\nget c\n\ndel lock\ndelrange a b\n",
            &plain,
        )
        .expect("parse");
        assert_eq!(t.compares.len(), 3);
        assert_eq!(
            t.compares[0],
            Compare { key: b"lock".to_vec(), op: CompareOp::Equal, target: CompareTarget::ModRevision(0) }
        );
        assert_eq!(t.compares[1].target, CompareTarget::Value(b"old value".to_vec()));
        assert_eq!(t.compares[2].target, CompareTarget::Exists(true));
        assert_eq!(
            t.success[0],
            TxnOp::Put { key: b"lock".to_vec(), value: b"me \"x\"".to_vec(), prev_kv: true, lease: 0 }
        );
        assert_eq!(t.success[1], TxnOp::Get { key: b"c".to_vec() });
        assert_eq!(
            t.failure,
            vec![
                TxnOp::Delete { key: b"lock".to_vec(), prev_kv: false },
                TxnOp::DeleteRange { start: b"a".to_vec(), end: b"b".to_vec() },
            ]
        );
        let t = parse("create(lock) = 0\n\nput lock me --lease 42\n", &plain).expect("parse");
        assert_eq!(
            t.success[0],
            TxnOp::Put { key: b"lock".to_vec(), value: b"me".to_vec(), prev_kv: false, lease: 42 }
        );
        assert!(parse("\nget k --lease 4\n", &plain).is_err());
        // No comparisons: the success part comes right after the first blank line.
        let t = parse("\nput a b\n", &plain).expect("parse");
        assert!(t.compares.is_empty() && t.success.len() == 1 && t.failure.is_empty());
    }

    #[test]
    fn mistakes_name_their_line() {
        for (text, want) in [
            ("mod(k) ~ 1\n", "line 1"),
            ("mod(k) = x\n", "a number"),
            ("size(k) = 1\n", "the field"),
            ("mod(k) = 1\n\nput k\n", "line 3"),
            ("\nput k \"open\n", "unclosed quote"),
            ("mod(k) = 1\n\nput a b\n\nget a\n\nget b\n", "more than three parts"),
        ] {
            let e = parse(text, &plain).expect_err(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
