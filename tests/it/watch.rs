//! `stagecraft watch` and `submit --follow`: piped lines, JSON lines, a pseudo-terminal, exit
//! statuses, and a stream that drops mid-run and is resumed without losing or repeating events.

use std::{
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::support::{Backend, TestApp};

const WAIT: Duration = Duration::from_secs(30);

/// Runs the CLI against `url` to the end, off the async runtime.
async fn cli(app: &TestApp, url: &str, args: &[&str]) -> Output {
    let mut command = app.command(args);
    command.env("STAGECRAFT_URL", url).stdin(Stdio::null());
    tokio::task::spawn_blocking(move || command.output().expect("the cli runs"))
        .await
        .expect("joined")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_each_event_piped_or_as_json_and_exits_zero_for_a_completed_run() {
    let app = TestApp::started(Backend::Sqlite);
    let url = app.base_url.clone();

    // Piped: plain lines, one per event, naming each stage; 0 for a completed run.
    let id = app.submit_demo(json!({"sleep_ms": 200, "steps": 2})).await;
    let output = cli(&app, &url, &["watch", &id]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    for stage in ["one", "two", "three"] {
        assert!(text.contains(&format!("stage_started {stage}")), "{text}");
        assert!(text.contains(&format!("stage_completed {stage}")), "{text}");
    }
    assert!(text.contains("step_completed two"), "{text}");
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with(&format!("run {id} completed"))),
        "{text}"
    );
    assert!(
        !text.contains('\x1b'),
        "no terminal codes when piped: {text}"
    );

    // JSON lines: the events themselves, each once, in order.
    let output = cli(&app, &url, &["watch", &id, "--json"]).await;
    assert_eq!(output.status.code(), Some(0));
    let events: Vec<Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(events.last().expect("events")["kind"], "run_completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_exits_with_the_outcome_and_ctrl_c_detaches() {
    let app = TestApp::started(Backend::Sqlite);
    let url = app.base_url.clone();

    // A run that fails: 1.
    let failed = app.submit_demo(json!({"fatal": "two"})).await;
    let output = cli(&app, &url, &["watch", &failed]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stdout(&output).contains("failed"));

    // A run cancelled while watched: 2.
    let long = app.submit_demo(json!({"sleep_ms": 20_000})).await;
    app.wait_run(&long, WAIT, |r| r["status"] == "running")
        .await;
    // Ctrl-C detaches: 130, the commands to come back, and the run goes on.
    let mut detached = app.command(&["watch", &long]);
    detached
        .env("STAGECRAFT_URL", &url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = detached.spawn().expect("the cli starts");
    // Its first line is printed once it follows the run, its Ctrl-C handler in place.
    let first_line = child.stdout.take().expect("stdout");
    let (first_line, rest) = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut reader = std::io::BufReader::new(first_line);
        let mut line = String::new();
        reader.read_line(&mut line).expect("a first line");
        (line, reader)
    })
    .await
    .expect("joined");
    assert!(
        first_line.starts_with(&format!("run {long}")),
        "{first_line}"
    );
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let output = tokio::task::spawn_blocking(move || {
        // Read to the end, so that nothing it prints meanwhile meets a closed pipe.
        let mut rest = rest;
        let mut tail = String::new();
        std::io::Read::read_to_string(&mut rest, &mut tail).expect("its output");
        child.wait_with_output().expect("waited")
    })
    .await
    .expect("joined");
    assert_eq!(output.status.code(), Some(130), "{output:?}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains(&format!("stagecraft cancel {long}")),
        "{said}"
    );
    let (_, run) = app.get(&format!("/runs/{long}")).await;
    assert_eq!(run["status"], "running");

    let watching = {
        let (app_url, id) = (url.clone(), long.clone());
        let mut command = app.command(&["watch", &id]);
        command.env("STAGECRAFT_URL", app_url).stdin(Stdio::null());
        tokio::task::spawn_blocking(move || command.output().expect("the cli runs"))
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = app.post(&format!("/runs/{long}/cancel"), &json!({})).await;
    assert_eq!(status, 200);
    let output = watching.await.expect("joined");
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_exits_three_when_it_cannot_watch_and_follows_a_submission_on_a_terminal() {
    let app = TestApp::started(Backend::Sqlite);
    let url = app.base_url.clone();
    let id = app.submit_demo(json!({"sleep_ms": 10})).await;
    app.wait_status(&id, "completed", WAIT).await;

    // No such run, or no API: 3, with the reason.
    let unknown = "01936f0e-0000-7000-8000-000000000000";
    let output = cli(&app, &url, &["watch", unknown]).await;
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not_found"));
    let output = cli(&app, "http://127.0.0.1:9", &["watch", &id]).await;
    assert_eq!(output.status.code(), Some(3));

    // submit --follow: the same view of the run it submitted.
    let output = cli(
        &app,
        &url,
        &[
            "submit",
            "demo",
            "--inputs",
            r#"{"sleep_ms": 50}"#,
            "--follow",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(stdout(&output).contains("stage_completed three"));

    // On a terminal (a pseudo-terminal from `script`): redrawn in place, one line per stage.
    let binary = app.command(&[]).get_program().to_owned();
    let shell = format!(
        "STAGECRAFT_URL={url} {} watch {id}",
        binary.to_string_lossy()
    );
    let output = tokio::task::spawn_blocking(move || {
        Command::new("script")
            .args(["-qec", &shell, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .expect("script (bsdutils) runs")
    })
    .await
    .expect("joined");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let screen = stdout(&output);
    assert!(screen.contains("\x1b[2K"), "redrawn in place: {screen:?}");
    assert!(screen.contains(&format!("run {id}  demo  completed  3/3 stages")));
    assert!(screen.contains("attempt 1 of 3"), "{screen}");
}

/// Forwards connections to `target`; the first event stream that passes is cut after its
/// second event, so the watcher must reconnect and resume with `Last-Event-ID`. Answers the
/// proxy's URL and how many event streams passed.
async fn flaky_proxy(target: String) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("address"));
    let streams = Arc::new(AtomicUsize::new(0));
    let counter = streams.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (target, counter) = (target.clone(), counter.clone());
            tokio::spawn(relay(client, target, counter));
        }
    });
    (address, streams)
}

async fn relay(client: TcpStream, target: String, streams: Arc<AtomicUsize>) {
    let Ok(server) = TcpStream::connect(&target).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream =
        tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
    let mut buffer = vec![0u8; 16 * 1024];
    let mut cutting: Option<String> = None;
    while let Ok(n) = server_read.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let chunk = &buffer[..n];
        let text = String::from_utf8_lossy(chunk);
        if cutting.is_none()
            && text.contains("text/event-stream")
            && streams.fetch_add(1, Ordering::SeqCst) == 0
        {
            cutting = Some(String::new());
        }
        if client_write.write_all(chunk).await.is_err() {
            break;
        }
        if let Some(seen) = cutting.as_mut() {
            seen.push_str(&text);
            if seen.matches("id:").count() >= 2 {
                break;
            }
        }
    }
    upstream.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_is_resumed_without_losing_or_repeating_events() {
    let app = TestApp::started(Backend::Sqlite);
    let target = app.base_url.trim_start_matches("http://").to_owned();
    let (proxy, streams) = flaky_proxy(target).await;
    let id = app.submit_demo(json!({"sleep_ms": 300, "steps": 3})).await;
    let output = cli(&app, &proxy, &["watch", &id, "--json"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(
        streams.load(Ordering::SeqCst) >= 2,
        "the stream was cut and reopened"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("reconnecting"));
    let seqs: Vec<i64> = stdout(&output)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("a JSON line")["seq"]
                .as_i64()
                .expect("seq")
        })
        .collect();
    // Every event of the run, each once, in order.
    let (_, all) = app.get(&format!("/runs/{id}")).await;
    assert_eq!(all["status"], "completed");
    let direct = cli(&app, &app.base_url.clone(), &["watch", &id, "--json"]).await;
    let expected: Vec<i64> = stdout(&direct)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["seq"]
                .as_i64()
                .expect("seq")
        })
        .collect();
    assert_eq!(seqs, expected);
}
