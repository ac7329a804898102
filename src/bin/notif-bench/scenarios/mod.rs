//! The measurements, one file each; each prints its figures as one `RESULT` line.

pub mod conns;
pub mod durable;
pub mod flows;
pub mod replay;
pub mod sqlite;

/// `RESULT key=value ...`: the line bench/run.sh reads.
pub fn fmt_result(fields: &[(&str, String)]) -> String {
    let mut s = String::from("RESULT");
    for (k, v) in fields {
        s.push(' ');
        s.push_str(k);
        s.push('=');
        s.push_str(v);
    }
    s
}
