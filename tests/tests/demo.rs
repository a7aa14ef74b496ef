//! `make demo` as a user runs it: the `outbox-demo` binary with a load, a crashed child, then Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Lines of the demo's stdout, with a deadline per expectation.
struct Output {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Output {
    fn until(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with `{needle}` within {timeout:?}; output:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn rest(&mut self) -> String {
        self.seen.extend(self.rx.iter());
        self.seen.join("\n")
    }
}

fn after<'a>(line: &'a str, prefix: &str) -> &'a str {
    line.split_once(prefix).map(|(_, r)| r.trim()).unwrap()
}

#[test]
fn load_report_crash_report_and_ctrl_c_cleanup() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_outbox-demo"))
        .args(["--load", "200", "--api-port", "0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    for stream in [
        Box::new(demo.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(demo.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut out = Output { rx, seen: vec![] };

    let db = out.until("  database ", Duration::from_secs(120));
    let db_port: u16 = after(&db, "127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let api = after(
        &out.until("  demo API ", Duration::from_secs(5)),
        "demo API",
    )
    .to_owned();
    for group in ["pharmacy", "notification"] {
        let line = out.until(&format!("consumed: {group}"), Duration::from_secs(120));
        assert!(
            line.contains("exactly once: 200, missing: 0, duplicated: 0"),
            "{line}"
        );
    }
    out.until("end-to-end latency", Duration::from_secs(5));

    // A child that dies is reported once and not restarted.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let crashed = rt.block_on(
        reqwest::Client::new()
            .post(format!("{api}/orders?crash=after-commit"))
            .json(&serde_json::json!({"customer": "c", "items": [{"sku": "s", "quantity": 1}]}))
            .send(),
    );
    assert!(
        crashed.is_err(),
        "the API answered instead of exiting: {crashed:?}"
    );
    let report = out.until("!!! api exited", Duration::from_secs(30));
    assert!(
        report.contains("exit status: 3") && report.contains("not restarted"),
        "{report}"
    );

    kill(Pid::from_raw(demo.id() as i32), Signal::SIGINT).unwrap();
    let status = demo.wait().unwrap();
    let text = out.rest();
    assert!(status.success(), "{status}\n{text}");
    for name in ["notification-1", "pharmacy-1", "pharmacy-2", "relay"] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(name) && l.ends_with("stopped")),
            "{name} not stopped cleanly:\n{text}"
        );
    }
    assert!(text.contains("temporary data removed"), "{text}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", db_port)).is_err(),
        "the throwaway PostgreSQL still listens"
    );
}
