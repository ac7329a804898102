//! The mailer process: the only process that sends mail.
//!
//! It takes `Send` records from the reactor, sends them with [`crate::transport::Mailer`] and
//! reports one result per email. It keeps no queue of its own: the store's outbox is the
//! queue, and what this process does not report is handed out again. It may block as long
//! as a relay makes it; nothing else waits for it. On EOF from the reactor it stops.

use crate::ipc::{self, FromMailer, MailJob, MailOutcome, MailResult, ToMailer};
use crate::transport::Mailer;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

/// Emails sent before their results are reported, so that a long backlog reports as it
/// goes and a crash loses little work.
const REPORT_EVERY: usize = 50;

/// The mailer process's main loop. Returns the exit status.
pub fn run(input: OwnedFd, output: OwnedFd) -> i32 {
    crate::spawn::set_blocking(&input, true);
    crate::spawn::set_blocking(&output, true);
    let mut input = std::fs::File::from(input);
    let mut output = std::fs::File::from(output);
    let mut out = Vec::new();
    ipc::encode(&FromMailer::Hello { version: ipc::VERSION }, &mut out);
    if output.write_all(&out).is_err() {
        return 1;
    }
    let mut reader = ipc::FrameReader::default();
    let mut mailer: Result<Mailer, String> = Err("no mail settings received yet".into());
    let mut greeted = false;
    let mut jobs: Vec<MailJob> = Vec::new();
    loop {
        const CHUNK: usize = 64 * 1024;
        let spare = reader.spare(CHUNK);
        let n = match input.read(spare) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                continue;
            }
            Err(e) => {
                log::error!("reading from reactor: {e}");
                return 1;
            }
        };
        reader.filled(n);
        loop {
            match reader.next_frame::<ToMailer>() {
                Ok(Some(ToMailer::Hello { version })) => {
                    if version != ipc::VERSION {
                        log::error!("reactor speaks record version {version}, this mailer {}", ipc::VERSION);
                        return 1;
                    }
                    greeted = true;
                }
                Ok(Some(_)) if !greeted => {
                    log::error!("reactor sent a record before its hello");
                    return 1;
                }
                Ok(Some(ToMailer::Configure(settings))) => {
                    if let Ok(m) = mailer.as_mut() {
                        m.close();
                    }
                    mailer = Mailer::new(&settings).map_err(|e| e.to_string());
                    if let Err(e) = &mailer {
                        log::error!("mail settings unusable: {e}");
                    }
                }
                Ok(Some(ToMailer::Send { jobs: more })) => jobs.extend(more),
                Ok(Some(ToMailer::Logging(l))) => crate::logger::apply(&l),
                Ok(None) => break,
                Err(e) => {
                    log::error!("reactor: {e}");
                    return 1;
                }
            }
        }
        for chunk in jobs.chunks(REPORT_EVERY) {
            let results = match mailer.as_mut() {
                Ok(m) => m.send_batch(chunk),
                Err(why) => chunk
                    .iter()
                    .map(|j| MailResult {
                        id: j.id,
                        email: j.email.clone(),
                        outcome: MailOutcome::Retry(why.clone()),
                    })
                    .collect(),
            };
            for r in &results {
                match &r.outcome {
                    MailOutcome::Sent => log::debug!("email {} to {}: sent", r.id, r.email),
                    MailOutcome::Retry(why) | MailOutcome::Fail(why) => {
                        log::warn!("email {} to {}: {why}", r.id, r.email)
                    }
                }
            }
            out.clear();
            ipc::encode(&FromMailer::Results { results }, &mut out);
            if output.write_all(&out).is_err() {
                // The reactor is gone; the outbox hands these out again after a restart.
                return 0;
            }
        }
        jobs.clear();
        if n == 0 {
            if let Ok(m) = mailer.as_mut() {
                m.close();
            }
            log::debug!("reactor closed the pipe; exiting");
            return 0;
        }
    }
}
