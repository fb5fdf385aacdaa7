//! The API through a real `trainyard serve` process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::Sandbox;

/// A pipeline whose last stage pretrains a small model for `steps` steps.
fn pipeline(steps: u64) -> String {
    format!(
        "name: lm
seed: 7
stages:
  corpus:
    kind: ingest
    with: {{ source: {{ synthetic: {{ part: documents, documents: 200 }} }}, eval_ratio: 0.1 }}
  tok:
    kind: tokenizer
    inputs: {{ text: corpus/train.jsonl }}
    with: {{ vocab_size: 300 }}
  cache:
    kind: token-cache
    inputs: {{ train: corpus/train.jsonl, eval: corpus/eval.jsonl, tokenizer: tok }}
  lm:
    kind: pretrain
    inputs: {{ data: cache, tokenizer: tok }}
    with: {{ model: {{ family: llama, layers: 1, heads: 2, dim: 32 }}, context: 32, batch_size: 4, steps: {steps}, eval_every: 10, eval_batches: 2, save_every: 10 }}
"
    )
}

/// A running `trainyard serve` on a free port; killed when dropped.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub token: String,
}

impl Server {
    pub fn start(sandbox: &Sandbox) -> Server {
        let mut child = sandbox
            .command(&["serve", "--listen", "127.0.0.1:0", "--heartbeat-ms", "200"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn trainyard serve");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let base = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        let token = sandbox.read(".trainyard/serve/token").trim().to_string();
        Server { child, base, token }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into()
    }

    /// `(status, JSON body)` of a GET with the token.
    fn get(&self, path: &str) -> (u16, Value) {
        let mut response = Server::agent()
            .get(&self.url(path))
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            serde_json::from_str(&response.body_mut().read_to_string().unwrap_or_default())
                .unwrap_or(Value::Null),
        )
    }

    /// `(status, JSON body)` of a POST of `body` with the token.
    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let request = Server::agent()
            .post(&self.url(path))
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", "application/json");
        // An empty body as `Content-Length: 0` (ureq would otherwise send it chunked).
        let sent = match body {
            "" => request.send_empty(),
            body => request.send(body),
        };
        let mut response = sent.unwrap_or_else(|error| panic!("POST {path}: {error}"));
        let status = response.status().as_u16();
        (
            status,
            serde_json::from_str(&response.body_mut().read_to_string().unwrap_or_default())
                .unwrap_or(Value::Null),
        )
    }

    /// The job's events until `until` returns true for one (or the stream ends), as
    /// `(id, event, data)`; from after `last_id` when given.
    fn events(
        &self,
        job: i64,
        last_id: Option<&str>,
        mut until: impl FnMut(&str, &Value) -> bool,
    ) -> Vec<(Option<String>, String, Value)> {
        let mut request = Server::agent()
            .get(&self.url(&format!("/api/jobs/{job}/events")))
            .header("Authorization", &format!("Bearer {}", self.token));
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        let mut response = request.call().unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let reader = BufReader::new(response.body_mut().as_reader());
        let mut events = Vec::new();
        let (mut id, mut name, mut data) = (None, String::new(), String::new());
        for line in reader.lines() {
            let line = line.unwrap();
            if let Some(value) = line.strip_prefix("id:") {
                id = Some(value.trim().to_string());
            } else if let Some(value) = line.strip_prefix("event:") {
                name = value.trim().to_string();
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push_str(value.trim());
            } else if line.is_empty() && !name.is_empty() {
                let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                let stop = until(&name, &value);
                events.push((id.take(), std::mem::take(&mut name), value));
                data.clear();
                if stop {
                    break;
                }
            }
        }
        events
    }

    pub fn wait_for_state(&self, job: i64, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, body) = self.get(&format!("/api/jobs/{job}"));
            if body["job"]["state"] == state {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "job {job} never became {state}: {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: the server stops its workers (they requeue their jobs) and exits.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Submit, follow the events to the end, list the artifacts and download a range of
/// one; the CLI sees the same queue.
#[test]
fn a_submitted_job_streams_its_events_to_the_end_and_its_artifacts_download_by_range() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", &pipeline(30));
    let server = Server::start(&sandbox);
    assert_eq!(server.get("/healthz").0, 200);
    let (status, created) = server.post("/api/jobs", r#"{"pipeline": "p.yaml"}"#);
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_i64().unwrap();

    let events = server.events(id, None, |name, _| name == "end");
    let named = |wanted: &str| events.iter().filter(|(_, name, _)| name == wanted).count();
    assert_eq!(named("train_step"), 30);
    assert_eq!(named("eval"), 3);
    assert_eq!(named("stage_started"), 4);
    assert_eq!(named("stage_finished"), 4);
    let (_, last, data) = events.last().unwrap();
    assert_eq!(
        (last.as_str(), &data["state"]),
        ("end", &json!("succeeded"))
    );
    // Steps arrive in order, each with its loss.
    let steps: Vec<u64> = events
        .iter()
        .filter(|(_, name, _)| name == "train_step")
        .map(|(_, _, data)| data["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>());

    // Resumed after an event, the stream sends only what followed it.
    let (resume_id, _, _) = events
        .iter()
        .find(|(_, name, data)| name == "train_step" && data["step"] == 20)
        .unwrap();
    let rest = server.events(id, resume_id.as_deref(), |name, _| name == "end");
    let rest_steps: Vec<u64> = rest
        .iter()
        .filter(|(_, name, _)| name == "train_step")
        .map(|(_, _, data)| data["step"].as_u64().unwrap())
        .collect();
    assert_eq!(rest_steps, (21..=30).collect::<Vec<_>>());

    let (_, detail) = server.get(&format!("/api/jobs/{id}"));
    assert_eq!(detail["job"]["state"], "succeeded");
    let stages: Vec<&str> = detail["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|stage| stage["name"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["corpus", "tok", "cache", "lm"]);
    let lm = &detail["stages"][3];
    assert_eq!(lm["status"], "executed");
    assert_eq!(lm["upstream"], json!(["cache", "tok"]));
    assert!(lm["fingerprint"].as_str().is_some_and(|f| !f.is_empty()));
    assert!(lm["metrics"]["train_loss"].as_f64().is_some(), "{lm}");

    let run = detail["job"]["runs"][0].as_str().unwrap().to_string();
    let (status, listed) = server.get(&format!("/api/runs/{run}/artifacts"));
    assert_eq!(status, 200);
    let weights = listed["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|artifact| artifact["stage"] == "lm" && artifact["path"] == "model.safetensors")
        .unwrap_or_else(|| panic!("no lm/model.safetensors in {listed}"))
        .clone();
    let on_disk =
        std::fs::read(sandbox.path(&format!("runs/{run}/outputs/lm/model.safetensors"))).unwrap();
    assert_eq!(weights["size"], on_disk.len());
    assert_eq!(weights["hash"], blake3::hash(&on_disk).to_hex().to_string());
    let mut response = Server::agent()
        .get(&server.url(weights["url"].as_str().unwrap()))
        .header("Authorization", &format!("Bearer {}", server.token))
        .header("Range", "bytes=100-1123")
        .call()
        .unwrap();
    assert_eq!(response.status().as_u16(), 206);
    let part = response.body_mut().read_to_vec().unwrap();
    assert_eq!(part, on_disk[100..1124]);

    // The CLI reads the same queue.
    let jobs = sandbox.ok(&["jobs", "--json"]);
    let jobs: Value = serde_json::from_str(&jobs).unwrap();
    assert_eq!(jobs[0]["state"], "succeeded");
    let logged = sandbox.ok(&["logs", &id.to_string()]);
    assert_eq!(
        logged
            .lines()
            .filter(|line| line.contains("\"train_step\""))
            .count(),
        30
    );
}

/// No token: 401. A path leaving the store: 404. A malformed job: 422 naming the field.
#[test]
fn tokens_paths_and_bodies_are_checked() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", &pipeline(2));
    std::fs::create_dir_all(sandbox.path("elsewhere")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("p.yaml"), pipeline(2)).unwrap();
    let server = Server::start(&sandbox);
    let agent = Server::agent();
    for path in ["/api/jobs", "/api/jobs/1", "/api/runs/x/artifacts"] {
        let response = agent.get(&server.url(path)).call().unwrap();
        assert_eq!(response.status().as_u16(), 401, "{path}");
        let response = agent
            .get(&server.url(path))
            .header("Authorization", "Bearer wrong")
            .call()
            .unwrap();
        assert_eq!(response.status().as_u16(), 401, "{path} with a wrong token");
    }
    assert_eq!(
        agent
            .get(&server.url("/healthz"))
            .call()
            .unwrap()
            .status()
            .as_u16(),
        200
    );

    for (body, field) in [
        (r#"{"pipeline": "p.yaml", "retries": "twice"}"#, "retries"),
        (r#"{"pipeline": "p.yaml", "profile": ["dev"]}"#, "."),
        (r#"{"profiles": []}"#, "."),
        (r#"{"pipeline": 7}"#, "pipeline"),
    ] {
        let (status, error) = server.post("/api/jobs", body);
        assert_eq!(status, 422, "{body}: {error}");
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{error}"
        );
        if field != "." {
            assert_eq!(error["field"], field, "{body}");
        }
    }
    let (status, error) = server.post("/api/jobs", "{not json");
    assert_eq!(status, 422, "{error}");
    // The pipeline must be a file inside the workspace.
    let escape = format!("../{}/p.yaml", outside.path().display());
    for pipeline in [
        outside.path().join("p.yaml").display().to_string(),
        escape,
        "elsewhere".to_string(),
    ] {
        let (status, error) =
            server.post("/api/jobs", &json!({ "pipeline": pipeline }).to_string());
        assert_eq!(status, 422, "{pipeline}: {error}");
        assert_eq!(error["field"], "pipeline");
    }
    // Bodies have a size limit: refused from the declared length, before it is read.
    let huge = json!({ "pipeline": "p.yaml", "set": vec!["a=b".repeat(1000); 100] }).to_string();
    let status = raw_request(
        &server,
        &format!(
            "POST /api/jobs HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            huge.len()
        ),
        &huge,
    );
    assert_eq!(status, 413);

    // A finished job's files, and paths that try to leave its output.
    let (_, created) = server.post("/api/jobs", r#"{"pipeline": "p.yaml"}"#);
    let id = created["id"].as_i64().unwrap();
    let detail = server.wait_for_state(id, "succeeded");
    let run = detail["job"]["runs"][0].as_str().unwrap();
    std::os::unix::fs::symlink("/etc/passwd", sandbox.path("runs/leak")).unwrap();
    // Sent as written: no client-side normalisation of `..`.
    let raw_get = |path: &str| raw_request(&server, &format!("GET {path} HTTP/1.1\r\n"), "");
    assert_eq!(
        raw_get(&format!("/api/runs/{run}/files/lm/config.json")),
        200
    );
    for path in [
        format!("/api/runs/{run}/files/lm/../../../../../../etc/passwd"),
        format!("/api/runs/{run}/files/lm/%2e%2e/%2e%2e/%2e%2e/etc/passwd"),
        format!("/api/runs/{run}/files/lm/%2Fetc%2Fpasswd"),
        format!("/api/runs/{run}/files/..%2F..%2F..%2Fetc/passwd"),
        "/api/runs/..%2F..%2F..%2Fetc/files/x/passwd".to_string(),
        "/api/runs/leak/artifacts".to_string(),
        format!("/api/runs/{run}/files/lm/missing.bin"),
    ] {
        assert_eq!(raw_get(&path), 404, "{path}");
    }
    // A symlink placed in an output that points out of the store is not followed.
    let lm = sandbox
        .path(&format!("runs/{run}/outputs/lm"))
        .canonicalize()
        .unwrap();
    let mut permissions = std::fs::metadata(&lm).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    permissions.set_readonly(false);
    std::fs::set_permissions(&lm, permissions).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", lm.join("passwd")).unwrap();
    assert_eq!(raw_get(&format!("/api/runs/{run}/files/lm/passwd")), 404);
}

/// The status of a request written by hand: `head` is the request line and headers
/// (host, token and `Connection: close` are added), `body` follows.
fn raw_request(server: &Server, head: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let address = server.base.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let request = format!(
        "{head}Host: {address}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        server.token
    );
    stream.write_all(request.as_bytes()).unwrap();
    // The server may answer (413) and close before the body is read.
    let _ = stream.write_all(body.as_bytes());
    let mut text = Vec::new();
    let _ = stream.read_to_end(&mut text);
    String::from_utf8_lossy(&text)
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("no status in {:?}", String::from_utf8_lossy(&text)))
}

/// Cancel: a queued job at once; a running one stops (its training checkpoints).
#[test]
fn a_running_job_and_a_queued_one_can_be_cancelled() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", &pipeline(100_000));
    let server = Server::start(&sandbox);
    let (_, first) = server.post("/api/jobs", r#"{"pipeline": "p.yaml"}"#);
    let (_, second) = server.post("/api/jobs", r#"{"pipeline": "p.yaml"}"#);
    let (first, second) = (
        first["id"].as_i64().unwrap(),
        second["id"].as_i64().unwrap(),
    );
    // Training has begun.
    server.events(first, None, |name, _| name == "train_step");
    let (status, queued) = server.post(&format!("/api/jobs/{second}/cancel"), "");
    assert_eq!((status, &queued["state"]), (200, &json!("cancelled")));
    let (status, _) = server.post(&format!("/api/jobs/{first}/cancel"), "");
    assert_eq!(status, 200);
    let events = server.events(first, None, |name, _| name == "end");
    let (_, _, end) = events.last().unwrap();
    assert_eq!(end["state"], "cancelled");
    assert!(
        events
            .iter()
            .any(|(_, name, data)| name == "stage_interrupted" && data["stage"] == "lm"),
        "the training stage stopped as interrupted"
    );
    // A finished job cannot be cancelled again; it can be retried.
    assert_eq!(server.post(&format!("/api/jobs/{first}/cancel"), "").0, 409);
    assert_eq!(server.get("/api/jobs/999").0, 404);
}

/// `kill -9` of the server mid-training: its workers stop their runs (a checkpoint) and
/// requeue the job; a restarted server finishes it, with weights bit-identical to an
/// uninterrupted run's.
#[test]
fn a_job_survives_kill_9_of_its_server_with_bit_identical_weights() {
    let steps = 300;
    let reference = Sandbox::new();
    reference.write("p.yaml", &pipeline(steps));
    reference.ok(&["run", "p.yaml"]);
    let expected =
        crate::common::file_hash(&reference.path("runs/latest/outputs/lm/model.safetensors"));

    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", &pipeline(steps));
    let mut server = Server::start(&sandbox);
    let (_, created) = server.post("/api/jobs", r#"{"pipeline": "p.yaml"}"#);
    let id = created["id"].as_i64().unwrap();
    server.events(id, None, |name, data| {
        name == "train_step" && data["step"] == 25
    });
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    let server = Server::start(&sandbox);
    let detail = server.wait_for_state(id, "succeeded");
    let job = &detail["job"];
    assert!(job["starts"].as_u64().unwrap() >= 2, "{job}");
    assert!(job["runs"].as_array().unwrap().len() >= 2, "{job}");
    let events = server.events(id, None, |name, _| name == "end");
    assert!(
        events
            .iter()
            .any(|(_, name, data)| name == "stage_interrupted" && data["stage"] == "lm"),
        "the first run stopped with a checkpoint"
    );
    let last_run = job["runs"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap();
    let got = crate::common::file_hash(
        &sandbox.path(&format!("runs/{last_run}/outputs/lm/model.safetensors")),
    );
    assert_eq!(
        got, expected,
        "resumed weights differ from an uninterrupted run's"
    );
}

/// 100 submits at once: every one queued with its own id, none lost, each run once.
#[test]
fn a_hundred_concurrent_submits_are_all_queued_and_each_runs_once() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: small
stages:
  corpus:
    kind: ingest
    with: { source: { synthetic: { part: documents, documents: 20 } } }
",
    );
    let server = Server::start(&sandbox);
    let ids: Vec<i64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..100)
            .map(|_| {
                scope.spawn(|| {
                    let (status, created) = server.post("/api/jobs", r#"{"pipeline": "p.yaml"}"#);
                    assert_eq!(status, 201, "{created}");
                    created["id"].as_i64().unwrap()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap())
            .collect()
    });
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (1..=100).collect::<Vec<i64>>(),
        "ids are distinct, none lost"
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let jobs = loop {
        let (_, listed) = server.get("/api/jobs");
        let jobs = listed["jobs"].as_array().unwrap().clone();
        if jobs.iter().all(|job| job["state"] == "succeeded") {
            break jobs;
        }
        assert!(Instant::now() < deadline, "not all jobs finished: {listed}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(jobs.len(), 100);
    let mut runs = std::collections::BTreeSet::new();
    for job in &jobs {
        assert_eq!(job["starts"], 1, "{job}");
        let job_runs = job["runs"].as_array().unwrap();
        assert_eq!(job_runs.len(), 1, "{job}");
        runs.insert(job_runs[0].as_str().unwrap().to_string());
    }
    assert_eq!(runs.len(), 100, "each job has its own run");
    let recorded = std::fs::read_dir(sandbox.path("runs"))
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name() != "latest")
        .count();
    assert_eq!(recorded, 100, "no job ran twice");
}
