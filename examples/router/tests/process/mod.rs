//! The example router as its own process, for the tests.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::support::{TestSystem, within};

/// The router, started against `system`, once it says it is ready.
pub async fn start_router(system: &TestSystem) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut router = Command::new(env!("CARGO_BIN_EXE_example-router"))
        .args([
            "--connection",
            &format!("http://{}", system.addrs.connection),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(router.stdout.take().unwrap()).lines();
    let ready = within("the router's ready line", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(ready.starts_with("ready"), "{ready}");
    (router, lines)
}
