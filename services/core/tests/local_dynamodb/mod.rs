//! A local DynamoDB-protocol server for tests: moto's server mode, started
//! once per test process on a port the server picks itself (no race for a
//! free port), and gone when the process is: it exits when its stdin, a
//! pipe this process holds, closes.
//!
//! moto comes from PyPI (`pip install "moto[server]"`); the README's test
//! command installs it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

const SERVER: &str = r#"
import logging, os, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server._server.server_port, flush=True)
sys.stdin.read()
os._exit(0)
"#;

struct Server {
    endpoint: String,
    /// Held so that its stdin stays open while the process lives.
    _child: Mutex<Child>,
}

/// The endpoint URL of the process's server, starting it on first use.
pub fn endpoint() -> String {
    static SERVER_ONCE: OnceLock<Server> = OnceLock::new();
    SERVER_ONCE
        .get_or_init(|| {
            let mut child = Command::new("python3")
                .args(["-c", SERVER])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("python3 runs");
            let stdout = child.stdout.take().expect("a stdout pipe");
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("moto prints its port");
            let port: u16 = line.trim().parse().unwrap_or_else(|_| {
                panic!("moto's server did not start (pip install \"moto[server]\"): {line:?}")
            });
            Server {
                endpoint: format!("http://127.0.0.1:{port}"),
                _child: Mutex::new(child),
            }
        })
        .endpoint
        .clone()
}
