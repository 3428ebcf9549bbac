//! How users run it: compose files, Dockerfiles and shell scripts checked, and the compose
//! topology run as local processes through the Makefile (`make dev-awo`, `make scale`,
//! `make stop`), since this machine has no Docker engine.

use std::{path::Path, process::Command, time::Duration};

use serde_json::json;

use crate::support::free_port;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn run(program: &str, args: &[&str]) -> (bool, String) {
    run_with(program, args, &[])
}

fn run_with(program: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(program);
    command.args(args).env_remove("API_TOKEN").current_dir(ROOT);
    let output = command
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (make test-deps installs it)"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// The lines of one service in a compose file, up to the next service or top-level key.
fn service_block(compose: &str, name: &str) -> String {
    let header = format!("  {name}:");
    let mut lines = compose.lines().skip_while(|l| *l != header);
    let first = lines.next().unwrap_or_else(|| panic!("no service {name}"));
    let mut block = vec![first];
    for line in lines {
        let sibling = line.starts_with("  ")
            && !line.starts_with("   ")
            && !line.trim_start().starts_with('#');
        let top_level = !line.is_empty() && !line.starts_with(' ');
        if sibling || top_level {
            break;
        }
        block.push(line);
    }
    block.join("\n")
}

/// High availability on top of the production stack: every process follows the sentinels and
/// waits for a replica; every Redis node refuses writes without one.
#[test]
fn the_high_availability_stack_follows_sentinels_and_waits_for_a_replica() {
    let (ok, config) = run_with(
        "docker-compose",
        &[
            "-f",
            "docker/docker-compose.prod.yml",
            "-f",
            "docker/docker-compose.ha.yml",
            "--profile",
            "awo",
            "config",
        ],
        &[("API_TOKEN", "a-token")],
    );
    assert!(ok, "{config}");
    for service in ["api", "worker", "awo-worker"] {
        let block = service_block(&config, service);
        for needed in [
            "REDIS_SENTINELS: sentinel-1:26379",
            "REDIS_DURABLE_ACKS: '1'",
        ] {
            assert!(block.contains(needed), "{service} lacks {needed}:\n{block}");
        }
    }
    for node in ["redis", "redis-replica-1", "redis-replica-2"] {
        let block = service_block(&config, node);
        assert!(block.contains("min-replicas-to-write"), "{node}:\n{block}");
    }
    for sentinel in ["sentinel-1", "sentinel-2", "sentinel-3"] {
        assert!(
            service_block(&config, sentinel).contains("sentinel monitor stagecraft redis 6379 2"),
            "{sentinel}"
        );
    }
}

/// Both stacks offer PostgreSQL as a profile, and hand the store's settings to every process.
#[test]
fn the_stacks_offer_postgres_as_a_profile() {
    for file in [
        "docker/docker-compose.yml",
        "docker/docker-compose.prod.yml",
    ] {
        let (ok, config) = run_with(
            "docker-compose",
            &[
                "-f",
                file,
                "--profile",
                "postgres",
                "--profile",
                "awo",
                "config",
            ],
            &[
                ("API_TOKEN", "a-token"),
                ("QUEUE_BACKEND", "postgres"),
                (
                    "DATABASE_URL",
                    "postgres://stagecraft:pw@postgres:5432/stagecraft",
                ),
                ("POSTGRES_PASSWORD", "pw"),
            ],
        );
        assert!(ok, "{file}: {config}");
        let postgres = service_block(&config, "postgres");
        assert!(postgres.contains("pg_isready"), "{file}:\n{postgres}");
        for service in ["api", "worker", "awo-worker"] {
            let block = service_block(&config, service);
            for needed in ["QUEUE_BACKEND: postgres", "DATABASE_URL: postgres://"] {
                assert!(block.contains(needed), "{file}: {service} lacks {needed}");
            }
        }
    }
}

#[test]
fn compose_files_are_valid_with_the_awo_profile_and_a_scalable_worker() {
    for file in [
        "docker/docker-compose.yml",
        "docker/docker-compose.prod.yml",
    ] {
        let token = [("API_TOKEN", "a-token")];
        let (ok, out) = run_with("docker-compose", &["-f", file, "config", "-q"], &token);
        assert!(ok, "{file}: {out}");
        let (ok, services) = run_with(
            "docker-compose",
            &["-f", file, "--profile", "awo", "config", "--services"],
            &token,
        );
        assert!(ok, "{file}: {services}");
        for service in ["redis", "api", "worker", "awo-worker"] {
            assert!(
                services.lines().any(|s| s == service),
                "{file} lacks {service}: {services}"
            );
        }
        let text = std::fs::read_to_string(Path::new(ROOT).join(file)).expect("compose file");
        let worker = service_block(&text, "worker");
        assert!(
            !worker.contains("container_name") && !worker.contains("ports:"),
            "{file}: the worker cannot scale:\n{worker}"
        );
        let redis = service_block(&text, "redis");
        for needed in [
            "--appendonly",
            "noeviction",
            "healthcheck",
            "redis-data:/data",
        ] {
            assert!(redis.contains(needed), "{file}: redis lacks {needed}");
        }
        assert!(
            !text.contains("ghp_") && !text.contains("sk-ant"),
            "{file} carries a credential"
        );
    }
    let dev = std::fs::read_to_string(Path::new(ROOT).join("docker/docker-compose.yml"))
        .expect("compose");
    // Development: open, so published on the host's loopback only.
    assert!(service_block(&dev, "awo-api").contains("127.0.0.1:${ARCHON_AWO_PORT:-8888}:8000"));
    assert!(service_block(&dev, "api").contains("127.0.0.1:${PORT:-8000}:8000"));
    assert!(service_block(&dev, "api").contains("/health"));
    assert!(dev.contains("ALLOW_UNAUTHENTICATED: \"true\""));
    // Production: closed; compose refuses to start it without a token, saying so.
    let (ok, out) = run(
        "docker-compose",
        &["-f", "docker/docker-compose.prod.yml", "config", "-q"],
    );
    assert!(!ok && out.contains("API_TOKEN"), "{out}");
    // Each secret only where it is needed.
    for file in [
        "docker/docker-compose.yml",
        "docker/docker-compose.prod.yml",
    ] {
        let (ok, config) = run_with(
            "docker-compose",
            &["-f", file, "--profile", "awo", "config"],
            &[("API_TOKEN", "a-token"), ("GITHUB_TOKEN", "gh-token-value")],
        );
        assert!(ok, "{config}");
        let worker = service_block(&config, "worker");
        let awo = service_block(&config, "awo-worker");
        let api = service_block(&config, "api");
        assert!(awo.contains("gh-token-value"), "{file}: {awo}");
        // The work-order worker runs as root only to drop to the agent's user.
        for needed in ["cap_drop", "SETUID", "no-new-privileges:true"] {
            assert!(awo.contains(needed), "{file}: awo-worker lacks {needed}");
        }
        assert!(
            !awo.contains("SYS_ADMIN") && !awo.contains("privileged: true"),
            "{file}"
        );
        for (name, block) in [("worker", &worker), ("api", &api)] {
            assert!(
                !block.contains("gh-token-value"),
                "{file}: {name} gets GITHUB_TOKEN"
            );
        }
        assert!(
            !worker.contains("a-token") && !awo.contains("a-token"),
            "{file}: workers get API_TOKEN"
        );
    }
}

#[test]
fn dockerfiles_pin_their_bases_and_run_as_a_user() {
    for file in [
        "docker/Dockerfile",
        "docker/Dockerfile.prod",
        "docker/Dockerfile.awo",
    ] {
        let text = std::fs::read_to_string(Path::new(ROOT).join(file)).expect("dockerfile");
        let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert!(!froms.is_empty(), "{file}");
        for from in froms {
            let image = from.split_whitespace().nth(1).unwrap_or_default();
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
            assert!(
                !tag.is_empty() && tag != "latest",
                "{file}: {from} is not pinned"
            );
        }
        let user = text
            .lines()
            .rev()
            .find(|l| l.starts_with("USER "))
            .unwrap_or_else(|| panic!("{file} names no user"));
        let root = matches!(user.trim_start_matches("USER ").trim(), "root" | "0");
        // Only the work-order worker runs as root, to run the coding agent as a user of its own.
        let drops_to_agent = file.ends_with(".awo")
            && text.contains("AWO_AGENT_USER=agent")
            && text.contains("useradd --system --uid 10002");
        assert!(!root || drops_to_agent, "{file}: {user}");
        assert!(
            !text.contains("ANTHROPIC_API_KEY=") && !text.contains("GITHUB_TOKEN="),
            "{file} bakes in a credential"
        );
    }
    let ignore =
        std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).expect(".dockerignore");
    for entry in ["target/", ".env", ".git/"] {
        assert!(
            ignore.lines().any(|l| l == entry),
            ".dockerignore lacks {entry}"
        );
    }
}

#[test]
fn shell_scripts_pass_shellcheck() {
    let (ok, out) = run(
        "shellcheck",
        &[
            "scripts/dev.sh",
            "scripts/invoke.sh",
            "scripts/stack.sh",
            "scripts/test-deps.sh",
            "docker/entrypoint.sh",
            ".ci/run",
        ],
    );
    assert!(ok, "{out}");
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git");
    assert!(
        status.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_dev_awo_runs_the_stack_as_processes_scales_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, awo_port, redis_port) = (free_port(), free_port(), free_port());
    let stack_dir = dir.path().join("stack");
    let make = |target: &[&str]| {
        let output = Command::new("make")
            .arg("--no-print-directory")
            .arg("-C")
            .arg(ROOT)
            .args(target)
            .env("STACK_MODE", "native")
            .env("STACK_DIR", &stack_dir)
            .env("STACK_REDIS_PORT", redis_port.to_string())
            .env("PORT", port.to_string())
            .env("ARCHON_AWO_PORT", awo_port.to_string())
            .env("STAGECRAFT_BIN", env!("CARGO_BIN_EXE_stagecraft"))
            .env("DATA_DIR", dir.path().join("data"))
            .env("ARTIFACT_DIR", dir.path().join("artifacts"))
            .env("AWO_DATA_DIR", dir.path().join("awo"))
            .env("AWO_ALLOWED_URL_SCHEMES", "https,file")
            .env("LOG_LEVEL", "warn")
            .output()
            .expect("make");
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "make {target:?}: {text}");
        text
    };
    let pids = || -> Vec<(String, i32)> {
        std::fs::read_dir(&stack_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let stem = name.strip_suffix(".pid")?.to_owned();
                        let pid = std::fs::read_to_string(e.path())
                            .ok()?
                            .trim()
                            .parse()
                            .ok()?;
                        Some((stem, pid))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let up = make(&["dev-awo"]);
    assert!(
        up.contains("local processes"),
        "says which mode it uses: {up}"
    );
    let names: Vec<String> = pids().into_iter().map(|(n, _)| n).collect();
    for expected in [
        "redis",
        "api",
        "worker-1",
        "worker-2",
        "awo-worker",
        "awo-api",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not started: {names:?}"
        );
    }
    let http = reqwest::Client::new();
    let health: serde_json::Value = http
        .get(format!("http://127.0.0.1:{awo_port}/health"))
        .send()
        .await
        .expect("awo port")
        .json()
        .await
        .expect("health");
    assert_eq!(health["backend"], "redis", "{health}");

    // A workflow and a work order complete through the API.
    let remote = dir.path().join("remote.git");
    git(
        dir.path(),
        &[
            "init",
            "--quiet",
            "--bare",
            "--initial-branch=main",
            remote.to_str().expect("path"),
        ],
    );
    let seed = dir.path().join("seed");
    git(
        dir.path(),
        &[
            "clone",
            "--quiet",
            remote.to_str().expect("path"),
            seed.to_str().expect("path"),
        ],
    );
    std::fs::write(seed.join("README.md"), "# App\n").expect("readme");
    git(&seed, &["add", "."]);
    git(&seed, &["commit", "--quiet", "-m", "init"]);
    git(&seed, &["push", "--quiet", "origin", "HEAD:main"]);
    let base = format!("http://127.0.0.1:{port}");
    let order: serde_json::Value = http
        .post(format!("{base}/agent-work-orders"))
        .json(&json!({"repository_url": format!("file://{}", remote.display()), "sandbox_type": "git_branch",
                      "workflow_type": "agent_workflow_plan", "user_request": "Add notes"}))
        .send()
        .await
        .expect("work order")
        .json()
        .await
        .expect("json");
    let order_id = order["agent_work_order_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let workflow: serde_json::Value = http
        .post(format!("{base}/workflows/pilot_only/run"))
        .json(&json!({"inputs": {"user_request": "Stack test", "total_budget": 10, "target_duration_secs": 4,
                                 "num_scenes": 2}, "async": true}))
        .send()
        .await
        .expect("workflow")
        .json()
        .await
        .expect("json");
    let run_id = workflow["run_id"].as_str().expect("run id").to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    for url in [
        format!("{base}/agent-work-orders/{order_id}"),
        format!("{base}/runs/{run_id}"),
    ] {
        loop {
            let doc: serde_json::Value = http
                .get(&url)
                .send()
                .await
                .expect("poll")
                .json()
                .await
                .expect("json");
            if doc["status"] == "completed" {
                break;
            }
            assert!(
                doc["status"] != "failed" && std::time::Instant::now() < deadline,
                "{doc:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Three workers, then nothing left behind.
    make(&["scale", "N=3"]);
    let workers: Vec<(String, i32)> = pids()
        .into_iter()
        .filter(|(n, _)| n.starts_with("worker-"))
        .collect();
    assert_eq!(workers.len(), 3, "{workers:?}");
    assert!(workers.iter().all(|(_, pid)| alive(*pid)));
    let all: Vec<i32> = pids().into_iter().map(|(_, pid)| pid).collect();
    make(&["stop"]);
    assert!(pids().is_empty(), "pid files left: {:?}", pids());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for pid in all {
        while alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "process {pid} outlived make stop"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The images build their dependencies first from the manifests alone: every crate of the
/// workspace must be there (its manifest copied, an empty library made), or the build fails
/// the day a crate is added.
#[test]
fn the_images_build_every_crate_of_the_workspace() {
    let crates: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("crates"))
        .expect("crates/")
        .flatten()
        .filter(|entry| entry.path().join("Cargo.toml").is_file())
        .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
        .collect();
    assert!(crates.len() >= 5, "{crates:?}");
    for file in ["docker/Dockerfile.prod", "docker/Dockerfile.awo"] {
        let text = std::fs::read_to_string(Path::new(ROOT).join(file)).expect("dockerfile");
        let made = text
            .lines()
            .find_map(|line| line.split_once("for crate in ")?.1.split_once("; do"))
            .map(|(list, _)| list.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("{file} makes no crate libraries"));
        for name in &crates {
            let copy = format!("COPY crates/{name}/Cargo.toml crates/{name}/");
            assert!(
                text.contains(&copy),
                "{file} does not copy {name}'s manifest"
            );
            assert!(
                made.contains(&name.as_str()),
                "{file} does not make {name}'s library"
            );
        }
    }
}
